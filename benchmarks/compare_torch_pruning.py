"""Torch-Pruning vs deploy-prune: the same models, the same ratio, the same ONNX Runtime run.

For every model (random init, fixed seed) this script

1. prunes one copy with Torch-Pruning (``MetaPruner`` + ``MagnitudeImportance(p=1)``, the classifier ignored)
   and one with deploy-prune (``analyze`` + ``l1`` + ``select`` + ``prune_channels``), at the same ratio and
   the same ``round_to``;
2. exports dense / TP / ours to ONNX with deploy-prune's exporter (dynamo, opset 18) into a temp folder and
   checks both pruned files against PyTorch with ``parity`` (tolerance relative to the output's scale);
3. times all three in ONE interleaved ``benchmark()`` call (same provider, threads, input, protocol);
4. prints a Markdown table: MACs, params, p50 latency, speedups vs dense and our latency / TP's latency.

One model's failure (in either tool, export, parity or timing) is caught and shown in the table; the
others still run. Torch-Pruning is an optional dependency (``pip install -e .[bench]``) and is imported
only here.

Example::

    python benchmarks/compare_torch_pruning.py --json /tmp/compare.json > /tmp/compare.md

What "L1" means in each tool (both are "prune the channels with the smallest L1 norm", but they score
coupled channels differently):

* deploy-prune ``l1`` (Li et al. 2017): a channel's score is the sum of |w| of the filters that *produce*
  it; in a residual group with projection shortcuts only the shortcut's filters count (Li et al. §3.3).
* Torch-Pruning ``MagnitudeImportance(p=1)``: the *mean* (``group_reduction="mean"``) over every parameter
  slice coupled to the channel - producing filters, consuming input slices, BatchNorm/LayerNorm affine -
  of its L1 norm, then divided by the group's mean (``normalizer="mean"``, irrelevant at a uniform ratio).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny")

L1_MEANING = {
    "deploy-prune": "l1 (Li et al. 2017): score = sum of |w| over the filters that produce the channel "
                    "(only the projection shortcut's filters in a residual group that has one); "
                    "keep int(n*(1-ratio)) per group, rounded to the nearest multiple of round_to",
    "torch-pruning": "MagnitudeImportance(p=1): score = mean over every coupled parameter slice (producing "
                     "filters, consuming input slices, BN/LN affine) of its L1 norm, normalized by the group "
                     "mean; keep int(n*(1-ratio)) per group, rounded down to a multiple of round_to",
}


# ----------------------------------------------------------------------------------------------------------
# helpers shared with torchvision_coverage.py


def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: write it like 1x3x224x224")
    return dims


def build(name: str, seed: int) -> tuple[nn.Module, list[str]]:
    """torchvision ``name`` with random init drawn after ``torch.manual_seed(seed)``, in eval mode.

    torchvision zero-initializes some weights (ViT's classification head), which makes the output identically
    zero: parity would prove nothing and L1 scores would all tie. Such all-zero conv/linear weights are redrawn
    from N(0, 0.01²); their names are returned.
    """
    from deploy_prune.loading import build_arch

    torch.manual_seed(seed)
    model, _ = build_arch(f"torchvision:{name}")
    redrawn = []
    with torch.no_grad():
        for mod_name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.01)
                redrawn.append(mod_name)
    return model.eval(), redrawn


def prune_ours(model: nn.Module, shape: tuple[int, ...], ratio: float, round_to: int) -> dict[str, Any]:
    """Prune ``model`` in place with deploy-prune's L1; returns what the analysis found."""
    from deploy_prune.criteria import ScoreContext, create
    from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select

    t0 = time.perf_counter()
    graph = analyze(model, shape)
    crit = create("l1")
    crit.prepare(model, graph, ScoreContext())
    plan = select(graph, crit, PlanConfig(ratio=ratio, round_to=round_to))
    prune_channels(model, graph, plan)
    model.eval()
    removed = sum(plan.widths[n] - len(k) for n, k in plan.kept.items())
    return {"groups": len(graph.groups), "skipped": dict(graph.skipped), "removed_channels": removed,
            "layers_changed": len(plan.kept), "seconds": round(time.perf_counter() - t0, 2)}


def tp_ignored_heads(model: nn.Module, num_outputs: int = 1000) -> list[nn.Module]:
    """What a Torch-Pruning user writes first: ignore the ``nn.Linear`` layers with ``num_outputs`` outputs."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_outputs]


def prune_tp(model: nn.Module, shape: tuple[int, ...], ratio: float, round_to: int) -> dict[str, Any]:
    """Prune ``model`` in place with Torch-Pruning's L1 MetaPruner (local, one step)."""
    import torch_pruning as tp

    ignored = tp_ignored_heads(model)
    t0 = time.perf_counter()
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
        pruner.step()
    model.eval()
    return {"ignored_layers": len(ignored), "seconds": round(time.perf_counter() - t0, 2)}


def one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2  # the head says where, the tail often says why (ONNX Runtime puts the cause last)
    return text[:half] + " … " + text[-half:]


def fmt_count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_x(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}×"


def fmt_ms(v: float | None) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime
    import torchvision

    from deploy_prune.bench import cpu_name, default_threads

    try:
        tp_version = version("torch-pruning")
    except PackageNotFoundError:
        tp_version = "not installed"
    return {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M %Z").strip(), "cpu": cpu_name(),
            "cores": str(default_threads()), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
            "torch-pruning": tp_version}


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


# ----------------------------------------------------------------------------------------------------------
# one model


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from deploy_prune.bench import benchmark
    from deploy_prune.export import cleanup_onnx, export_onnx, parity
    from deploy_prune.metrics import count_macs, count_params

    shape = tuple(args.input_shape)
    row: dict[str, Any] = {"model": name, "errors": {}}
    variants: dict[str, nn.Module] = {}
    try:
        dense, redrawn = build(name, args.seed)
        variants["dense"] = dense
        if redrawn:
            row["redrawn_zero_weights"] = redrawn
    except Exception as exc:  # noqa: BLE001  (reported in the table)
        row["errors"]["build"] = one_line(exc)
        return row
    for tool, fn in (("tp", prune_tp), ("ours", prune_ours)):
        m = copy.deepcopy(dense)
        try:
            row[f"{tool}_info"] = fn(m, shape, args.ratio, args.round_to)
            variants[tool] = m
        except Exception as exc:  # noqa: BLE001
            row["errors"][f"{tool} prune"] = one_line(exc)
            if args.verbose:
                traceback.print_exc()

    example = torch.randn(*shape, generator=torch.Generator().manual_seed(args.seed))
    inputs = [example, torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(args.seed + 1))]
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=f"cmp-{name}-") as tmp:
        for kind, m in variants.items():
            try:
                with torch.no_grad():
                    out = m(example)
                row[f"{kind}_out_shape"] = list(out.shape)
                row[f"{kind}_macs"] = count_macs(m, shape)
                row[f"{kind}_params"] = count_params(m)
                raw, clean = Path(tmp) / f"{kind}.raw.onnx", Path(tmp) / f"{kind}.onnx"
                export_onnx(m, raw, example)
                cleanup_onnx(raw, clean)
                raw.unlink()
                files[kind] = clean
                if kind != "dense":
                    p = parity(clean, m, inputs)
                    row[f"{kind}_parity"] = {k: p[k] for k in ("ok", "max_abs_diff", "max_rel_diff", "note")}
            except Exception as exc:  # noqa: BLE001
                row["errors"][f"{kind} export/parity"] = one_line(exc)
                if args.verbose:
                    traceback.print_exc()
        if files:
            try:
                res = benchmark(files, shape, provider=args.provider, threads=args.threads, iters=args.bench_iters,
                                progress=False)
                row["provider"] = res.provider
                row["threads"] = res.threads
                row["method"] = res.method
                for kind, st in res.stats.items():
                    row[f"{kind}_p50"] = st.p50
                    row[f"{kind}_latency_ms"] = st.to_dict()
            except Exception as exc:  # noqa: BLE001
                row["errors"]["benchmark"] = one_line(exc)
    d = row.get("dense_p50")
    for kind in ("tp", "ours"):
        if d and row.get(f"{kind}_p50"):
            row[f"{kind}_speedup"] = d / row[f"{kind}_p50"]
        if row.get("dense_macs") and row.get(f"{kind}_macs"):
            row[f"{kind}_mac_ratio"] = row["dense_macs"] / row[f"{kind}_macs"]
    if row.get("ours_p50") and row.get("tp_p50"):
        row["ours_over_tp"] = row["ours_p50"] / row["tp_p50"]
    return row


# ----------------------------------------------------------------------------------------------------------
# table


def _par(p: dict[str, Any] | None) -> str:
    if not p:
        return "—"
    return f"{'ok' if p['ok'] else 'FAIL'} ({p['max_rel_diff']:.0e})"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, str], wall_s: float) -> str:
    shape = "x".join(map(str, args.input_shape))
    prov = next((r["provider"] for r in rows if r.get("provider")), args.provider)
    thr = next((r["threads"] for r in rows if r.get("threads")), args.threads)
    method = next((r["method"] for r in rows if r.get("method")), "")
    out = [
        f"Command: `{command_line()}`",
        "",
        f"Date {env['date']}; {env['cpu']}, {env['cores']} cores (shared VM: timings carry ±10% noise); "
        f"Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"onnxruntime {env['onnxruntime']}, torch-pruning {env['torch-pruning']}.",
        f"Random init (seed {args.seed}), ratio {args.ratio}, round_to {args.round_to} for both tools, input {shape}, "
        f"provider {prov}, {thr} threads, {args.bench_iters} timed runs per variant. Wall time {wall_s / 60:.1f} min.",
        "",
        f"Timing: {method}" if method else "",
        "",
        "What \"L1\" means here:",
        f"- **ours** (deploy-prune) = {L1_MEANING['deploy-prune']}.",
        f"- **TP** (Torch-Pruning) = {L1_MEANING['torch-pruning']}. Ignored layers: the `nn.Linear` "
        "layers with 1000 outputs (the classifier).",
        "",
        "MACs and params are counted by `deploy_prune.metrics` for all three; \"×\" after a pruned count is "
        "dense / pruned. Speedup = p50 dense / p50 pruned from the same interleaved run; "
        "ours/TP = p50 ours / p50 TP (< 1: ours is faster). Parity: ONNX Runtime vs PyTorch, "
        "max|Δ| / max|y| in brackets.",
        "",
        "| model | MACs dense | MACs TP | MACs ours | params dense | params TP | params ours | p50 dense ms "
        "| p50 TP ms | p50 ours ms | speedup TP | speedup ours | ours/TP latency | parity TP | parity ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    notes = []
    for r in rows:
        def cnt(kind: str, what: str) -> str:
            v = r.get(f"{kind}_{what}")
            if v is None:
                return "error" if kind != "dense" and any(k.startswith(kind) for k in r["errors"]) else "—"
            if kind == "dense":
                return fmt_count(v)
            ratio = r.get(f"dense_{what}", 0) / v if v else None
            return f"{fmt_count(v)} ({fmt_x(ratio, 1)})"

        out.append(
            f"| {r['model']} | {cnt('dense', 'macs')} | {cnt('tp', 'macs')} | {cnt('ours', 'macs')} "
            f"| {cnt('dense', 'params')} | {cnt('tp', 'params')} | {cnt('ours', 'params')} "
            f"| {fmt_ms(r.get('dense_p50'))} | {fmt_ms(r.get('tp_p50'))} | {fmt_ms(r.get('ours_p50'))} "
            f"| {fmt_x(r.get('tp_speedup'))} | {fmt_x(r.get('ours_speedup'))} "
            f"| {'—' if r.get('ours_over_tp') is None else format(r['ours_over_tp'], '.2f')} "
            f"| {_par(r.get('tp_parity'))} | {_par(r.get('ours_parity'))} |"
        )
        for stage, msg in r["errors"].items():
            notes.append(f"- {r['model']}, {stage}: `{msg}`")
        skipped = (r.get("ours_info") or {}).get("skipped") or {}
        if skipped:
            reasons = sorted(set(skipped.values()))
            notes.append(f"- {r['model']}: deploy-prune left {len(skipped)} layer(s) unpruned "
                         f"({'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})")
        for kind in ("tp", "ours"):
            if r.get(f"{kind}_out_shape") and r.get("dense_out_shape") and r[f"{kind}_out_shape"] != r["dense_out_shape"]:
                notes.append(f"- {r['model']}: {kind} output shape {r[f'{kind}_out_shape']} != dense "
                             f"{r['dense_out_shape']}")
            p = r.get(f"{kind}_parity") or {}
            if kind == "tp" and r.get("redrawn_zero_weights"):
                notes.append(f"- {r['model']}: all-zero initial weights redrawn from N(0, 0.01²): "
                             f"{', '.join(r['redrawn_zero_weights'])}")
            if p.get("note"):
                notes.append(f"- {r['model']}, {kind} parity: {p['note']}")
    if notes:
        out += ["", "Notes and failures:", *notes]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated torchvision model names (default: %(default)s)")
    ap.add_argument("--ratio", type=float, default=0.5, help="channel ratio removed by both tools (default 0.5)")
    ap.add_argument("--round-to", type=int, default=8, help="channel multiple for both tools (default 8)")
    ap.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224), help="default 1x3x224x224")
    ap.add_argument("--bench-iters", type=int, default=50, help="timed runs per variant (default 50)")
    ap.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu, cuda or auto (default cpu)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per session (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures to stderr")
    args = ap.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        ap.error("Torch-Pruning is not installed: pip install -e .[bench]")

    torch.set_num_threads(args.threads)
    env = environment()
    t0 = time.perf_counter()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t1 = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            row = run_model(name, args)
        except Exception as exc:  # noqa: BLE001  (anything run_model did not catch itself)
            row = {"model": name, "errors": {"unexpected": one_line(exc)}}
        row["seconds"] = round(time.perf_counter() - t1, 1)
        print(f"[{name}] done in {row['seconds']:.0f}s; errors: {row['errors'] or 'none'}", file=sys.stderr, flush=True)
        rows.append(row)
    wall = time.perf_counter() - t0
    text = markdown(rows, args, env, wall)
    sys.stdout.write(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command_line(), "environment": env, "ratio": args.ratio,
                                         "round_to": args.round_to, "input_shape": list(args.input_shape),
                                         "bench_iters": args.bench_iters, "l1_meaning": L1_MEANING,
                                         "wall_s": round(wall, 1), "results": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
