"""Coverage of timm's CNN families: deploy-prune and Torch-Pruning side by side, one model per family.

For one model per timm CNN family (``FAMILIES`` below: the smallest variant, random init, fixed seed, ratio 0.5,
L1, round_to 8, no finetuning, one input size for all) this script records what benchmarks/torchvision_coverage.py
records for torchvision (it reuses its per-model routine): for **deploy-prune** pruned? (#groups), does the pruned
model run, is its output shape unchanged, ONNX parity, MAC ratio, ORT speedup and the layers left alone with their
reasons; for **Torch-Pruning 1.6.1** (``MetaPruner`` + ``MagnitudeImportance(p=1)``, ignoring the ``nn.Linear``
layers with 1000 outputs) pruned?, output shape, MAC ratio, ORT speedup, its error. Dense, ours and TP's pruned
model are timed in ONE interleaved ``benchmark()`` call per model.

Each model runs in its own subprocess (``--one NAME``) with a wall-clock timeout and an address-space cap. The
table is written into docs/coverage.md between the ``timm-coverage`` markers (the rest of the file is left as it
is); ``--json`` keeps the raw results.

Example (the command that regenerates the timm section of docs/coverage.md)::

    flock /tmp/deploy-prune-bench.lock python benchmarks/timm_coverage.py --out docs/coverage.md \\
        --json /tmp/timm_coverage.json

Re-run a few models and merge them into an existing result file::

    python benchmarks/timm_coverage.py --models ghostnet_100,mixnet_s --update --json /tmp/timm_coverage.json \\
        --out docs/coverage.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT_TAG = "@@TIMM-COVERAGE-RESULT@@ "
BEGIN, END = "<!-- timm-coverage:begin -->", "<!-- timm-coverage:end -->"


def markers(section: str | None) -> tuple[str, str]:
    """The begin/end markers of the table's section in the Markdown file (``--section`` names a second one)."""
    if not section:
        return BEGIN, END
    tag = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
    return f"<!-- timm-coverage-{tag}:begin -->", f"<!-- timm-coverage-{tag}:end -->"

# family -> the model measured (the smallest variant timm registers, unless a note says otherwise)
FAMILIES: dict[str, str] = {
    "GhostNet": "ghostnet_100",  # ghostnet_050's groups are 4-12 channels wide: see the notes
    "MixNet": "mixnet_s",
    "Res2Net": "res2net50_14w_8s",
    "CSPResNet": "cspresnet50",
    "ResNet": "resnet18",
    "ResNet-D": "resnet18d",
    "SE-ResNeXt": "seresnext26d_32x4d",
    "ResNeSt": "resnest14d",
    "SKNet": "skresnet18",
    "ECA-ResNet": "ecaresnet26t",
    "ResNetV2 (BiT, StdConv)": "resnetv2_50x1_bit",
    "NF-ResNet (ScaledStdConv)": "nf_resnet26",
    "RegNetX": "regnetx_002",
    "RegNetY": "regnety_002",
    "MobileNetV2": "mobilenetv2_035",
    "MobileNetV3": "mobilenetv3_small_050",
    "MobileNetV4": "mobilenetv4_conv_small",
    "EfficientNet": "efficientnet_b0",
    "EfficientNetV2 (TF 'same' padding)": "tf_efficientnetv2_b0",
    "MnasNet": "mnasnet_small",
    "LCNet": "lcnet_050",
    "GhostNetV2": "ghostnetv2_100",
    "ReXNet": "rexnet_100",
    "ConvNeXt": "convnext_atto",
    "ConvNeXt-V2": "convnextv2_atto",
    "DLA": "dla46_c",
    "HRNet": "hrnet_w18_small",
    "RepVGG": "repvgg_a0",
    "MobileOne": "mobileone_s0",
    "CS3DarkNet": "cs3darknet_s",
    "DenseNet": "densenet121",
    "DPN": "dpn48b",
    "VGG": "vgg11",
    "Inception-V3": "inception_v3",
    "Inception-ResNet-V2": "inception_resnet_v2",
    "Xception": "xception41",
    "VoVNet": "ese_vovnet19b_dw",
    "SelecSLS": "selecsls42b",
    "HGNetV2": "hgnetv2_b0",
    "FasterNet": "fasternet_t0",
    "PoolFormer (pooling token mixer)": "poolformer_s12",
    "InceptionNeXt": "inception_next_atto",
    "RepViT": "repvit_m0_9",
    "FastViT (RepMixer)": "fastvit_t8",
}
FAMILY_OF = {m: f for f, m in FAMILIES.items()}


# ----------------------------------------------------------------------------------------------------------
# one model (child process)


def _build_timm(name: str, seed: int) -> tuple[Any, list[str]]:
    """``timm:name`` exactly as ``deploy-prune run timm:NAME`` builds it (random init drawn after
    ``torch.manual_seed(seed)``, never downloading), in eval mode."""
    import torch

    from deploy_prune.loading import build_arch

    torch.manual_seed(seed)
    model, _ = build_arch(f"timm:{name}")
    return model.eval(), []


def child_main(args: argparse.Namespace) -> int:
    import compare_torch_pruning as C
    import torchvision_coverage as TV

    TV._limit_memory(args.mem_gb)
    C.build = _build_timm  # the per-model routine is torchvision_coverage's, on timm models
    TV.input_size = lambda name, size: size
    TV.family = lambda name: "cnn"
    name = args.one
    try:
        r = TV.run_one(name, args)
    except MemoryError as exc:
        r = {"model": name, "crash": f"MemoryError (> {args.mem_gb:g} GB address space): {exc}"}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        r = {"model": name, "crash": C.one_line(exc)}
    r["family"] = FAMILY_OF.get(name, name)
    sys.stdout.write(RESULT_TAG + json.dumps(r, default=str) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------
# parent


def run_child(name: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--ratio", str(args.ratio),
           "--round-to", str(args.round_to), "--cnn-size", str(args.cnn_size), "--bench-iters", str(args.bench_iters),
           "--bench-budget-s", str(args.bench_budget_s), "--provider", args.provider, "--threads", str(args.threads),
           "--seed", str(args.seed), "--mem-gb", str(args.mem_gb)]
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                 start_new_session=True) as proc:
        try:
            stdout, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started (its own session)
            proc.communicate()
            return {"model": name, "family": FAMILY_OF.get(name, name), "crash": f"timeout after {args.timeout} s",
                    "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            r["wall_s"] = wall
            return r
    import torchvision_coverage as TV

    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return {"model": name, "family": FAMILY_OF.get(name, name), "crash": f"{how}: {TV._tail(log)}", "wall_s": wall}


def _reasons(r: dict[str, Any]) -> dict[str, int]:
    import torchvision_coverage as TV

    o = r.get("ours") or {}
    return dict(Counter(TV._generic(v) for v in (o.get("skipped") or {}).values()).most_common())


def summary(results: list[dict[str, Any]]) -> list[str]:
    n = len(results)

    def ok(tool: str) -> list[dict[str, Any]]:
        return [r for r in results if (r.get(tool) or {}).get("ok")]

    ours, tp = ok("ours"), ok("tp")
    lines = [f"**deploy-prune: {len(ours)}/{n} families pruned with the forward running, the output shape "
             f"unchanged and ONNX parity ok**; **Torch-Pruning 1.6.1: {len(tp)}/{n}** by the same test."]
    named = [r for r in results if r["family"] in ("GhostNet", "MixNet", "Res2Net", "CSPResNet")]
    if named:
        import compare_torch_pruning as C

        lines.append("The four families the split/slice rewriting is for: " + ", ".join(
            f"{r['family']} {C.fmt_x((r.get('ours') or {}).get('mac_ratio'))} fewer MACs" for r in named) + ".")
    partial = [r for r in ours if any(k != "reaches the model's output" for k in _reasons(r))]
    if partial:
        lines.append(f"{len(partial)} of ours leave some layers alone with a reason (notes below): "
                     + ", ".join(r["model"] for r in partial) + ".")
    both = [r for r in results if (r.get("ours") or {}).get("ok") and (r.get("tp") or {}).get("ok")
            and r["ours"].get("speedup") and r["tp"].get("speedup")]
    if both:
        ratio = [r["ours"]["speedup"] / r["tp"]["speedup"] for r in both]
        lines.append(f"Where both succeed ({len(both)} models), ours' ORT speedup / TP's: median "
                     f"{statistics.median(ratio):.2f}, range {min(ratio):.2f}–{max(ratio):.2f}.")
    return lines


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    import compare_torch_pruning as C
    import torchvision_coverage as TV

    env = meta["environment"]
    begin, end = markers(meta.get("section"))
    out = [
        begin,
        "",
        "## timm CNN families: deploy-prune vs Torch-Pruning" + (f" ({meta['section']})" if meta.get("section")
                                                                 else ""),
        "",
        "<!-- generated by benchmarks/timm_coverage.py; do not edit by hand -->",
        "",
        f"Regenerate: `{meta['command']}`" + (f" (rows last re-run with `{meta['last_command']}`)"
                                             if meta.get("last_command") and meta["last_command"] != meta["command"]
                                             else ""),
        "",
        f"- Date: {env['date']}",
        f"- Machine: {env['cpu']}, {env['cores']} cores — a **shared 2-core VM** on which other engineers' jobs ran "
        f"at the same time (load average before each model's benchmark is in the JSON, `loadavg_before_bench`; "
        f"median {meta.get('median_load', '—')}): timings are noisy; the ratios come from one interleaved run per "
        "model.",
        f"- Versions: Python {env['python']}, torch {env['torch']}, timm {meta.get('timm', '?')}, "
        f"onnxruntime {env['onnxruntime']}, torch-pruning {env['torch-pruning']}",
        f"- ONNX Runtime: {meta['provider']}, {meta['threads']} intra-op threads; dense, ours and TP timed in one "
        f"interleaved `benchmark()` call per model, {meta['bench_iters']} kept runs per variant (fewer for models "
        f"slower than the {meta['bench_budget_s']:g} s per-model budget)",
        f"- Pruning: ratio {meta['ratio']}, L1, round_to {meta['round_to']}, random init (seed {meta['seed']}, "
        f"`timm.create_model(name, pretrained=False)`, as `deploy-prune run timm:NAME` builds it), no finetuning; "
        f"input 1x3x{meta['cnn_size']}x{meta['cnn_size']} for every model",
        f"- Each model in its own process, {meta['timeout']} s timeout, {meta['mem_gb']:g} GB address-space cap; "
        f"total wall time {meta['wall_s'] / 60:.0f} min",
        "",
        "### Summary",
        "",
        *[f"- {s}" for s in summary(results)],
        "",
        "Columns as in the torchvision table above. One model per family, the smallest variant timm registers "
        "(GhostNet: `ghostnet_100`, the paper's 1.0× model, because `ghostnet_050`'s groups are 4–12 channels "
        "wide and `--round-to 8` leaves most of them alone: see the notes).",
        "",
        "### Results",
        "",
        "| family | model | ours: pruned (groups) | fwd | shape | parity | MAC ratio | ORT speedup | left alone | "
        "TP: pruned | shape | MAC ratio | ORT speedup | TP error |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in results:
        out.append("| " + " | ".join([r["family"], f"`{r['model']}`", *TV._ours_cells(r), *TV._tp_cells(r)]) + " |")
    notes = []
    for r in results:
        o = r.get("ours") or {}
        if "crash" in r:
            notes.append(f"- **{r['model']}**: crashed: `{TV._short(r['crash'], 300)}`")
            continue
        for stage, msg in (r.get("errors") or {}).items():
            if not stage.startswith("tp"):
                notes.append(f"- **{r['model']}**, {stage}: `{TV._short(msg, 300)}`")
        reasons = {k: v for k, v in _reasons(r).items() if k != "reaches the model's output"}
        if reasons or not o.get("pruned"):
            why = "; ".join(f"{k} ×{v}" for k, v in list(reasons.items())[:3])
            head = "not pruned" if not o.get("pruned") else f"{o.get('layers_left_alone')} layers left alone"
            notes.append(f"- {r['model']} (ours): {head}: {TV._short(why, 400)}")
        if (o.get("parity") or {}).get("note"):
            notes.append(f"- {r['model']} (ours): {o['parity']['note']}")
    if meta.get("extra_notes"):
        notes.extend(f"- {n}" for n in meta["extra_notes"])
    if notes:
        out += ["", "### Notes: layers left alone and failures", "", *notes]
    out += ["", end]
    return "\n".join(out) + "\n"


def write_section(path: Path, section: str, name: str | None = None) -> None:
    """Replace the timm section ``name`` of ``path`` (between its markers), or append it."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def _write(results: dict[str, dict[str, Any]], previous: dict[str, Any], old_meta: dict[str, Any],
           args: argparse.Namespace, wall: float, done: bool) -> list[dict[str, Any]]:
    import compare_torch_pruning as C
    import timm

    order = list(FAMILIES.values())
    ordered = [results[n] for n in order if n in results] + [r for n, r in results.items() if n not in order]
    first = next((r for r in ordered if r.get("bench")), {})
    loads = [r["loadavg_before_bench"][0] for r in ordered if r.get("loadavg_before_bench")]
    keep, skip = [], False
    for a in sys.argv[1:]:  # the command that regenerates the whole table has no --models / --update
        if args.section:  # a named section is its own run: its command is the one given, models and all
            keep.append(a)
            continue
        if skip:
            skip = False
            continue
        if a == "--models":
            skip = True
            continue
        if a.startswith("--models=") or a == "--update":
            continue
        keep.append(a)
    notes = list(args.note or old_meta.get("extra_notes") or [])
    wanted = [m.strip() for m in args.models.split(",")] if args.section and args.models else FAMILIES.values()
    missing = [FAMILY_OF.get(m, m) for m in wanted if m not in results]
    if missing:
        notes.append("not measured in this run: " + ", ".join(missing))
    meta = {
        "command": "flock /tmp/deploy-prune-bench.lock python " + " ".join(
            shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + keep),
        "last_command": C.command_line() if args.models else None,
        "environment": C.environment(), "timm": timm.__version__,
        "provider": (first.get("bench") or {}).get("provider", args.provider),
        "threads": args.threads, "bench_iters": args.bench_iters, "bench_budget_s": args.bench_budget_s,
        "ratio": args.ratio, "round_to": args.round_to, "seed": args.seed, "cnn_size": args.cnn_size,
        "timeout": args.timeout, "mem_gb": args.mem_gb,
        "median_load": f"{statistics.median(loads):.1f}" if loads else "—",
        "wall_s": wall + (old_meta.get("wall_s", 0) if previous else 0),
        "extra_notes": notes, "complete": done,
    }
    meta["section"] = args.section
    section = markdown(ordered, meta)
    if args.out:
        write_section(args.out, section, args.section)
    elif done:
        sys.stdout.write(section)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": ordered}, indent=2, default=str))
    return ordered


def parent_main(args: argparse.Namespace) -> int:
    names = list(FAMILIES.values())
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.render:
        old = json.loads(args.json.read_text())
        old["meta"]["section"] = args.section or old["meta"].get("section")
        section = markdown(old["results"], old["meta"])
        if args.out:
            write_section(args.out, section, old["meta"]["section"])
        else:
            sys.stdout.write(section)
        return 0
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="timm-coverage-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(names)} model(s); per-model logs in {log_dir}", file=sys.stderr, flush=True)
    previous: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}  # the previous run's (with --update)
    if args.update and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        previous = {r["model"]: r for r in old["results"]}
        meta = old.get("meta", {})
    results = dict(previous)
    t0 = time.perf_counter()
    partial = (args.json or log_dir / "timm_coverage.json").with_suffix(".partial.jsonl")
    ordered: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        r = run_child(name, args, log_dir)
        results[name] = r
        with open(partial, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        o, t = r.get("ours") or {}, r.get("tp") or {}
        state = r.get("crash") or (f"ours {'ok' if o.get('ok') else 'NOT ok'} macs x{o.get('mac_ratio') or 0:.2f} "
                                   f"speed x{o.get('speedup') or 0:.2f}, tp {'ok' if t.get('ok') else 'NOT ok'} "
                                   f"x{t.get('speedup') or 0:.2f}")
        print(f"[{i}/{len(names)}] {name}: {r.get('wall_s')} s; {state[:160]}", file=sys.stderr, flush=True)
        # written after every model, so an interrupted run still leaves a valid table of what it measured
        ordered = _write(results, previous, meta, args, time.perf_counter() - t0, done=i == len(names))
    for s in summary(ordered):
        print(re.sub(r"\*\*", "", s), file=sys.stderr)
    print(f"wall time {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated timm model names (default: one per family in FAMILIES)")
    ap.add_argument("--out", type=Path, help="write the section into this Markdown file (default: stdout)")
    ap.add_argument("--json", type=Path, help="write the raw per-model results here")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of --json's models that are not re-run (use with --models)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8, help="channel multiple for both tools (default 8)")
    ap.add_argument("--cnn-size", type=int, default=128, help="input height/width (default 128)")
    ap.add_argument("--bench-iters", type=int, default=20, help="kept timed runs per variant (default 20)")
    ap.add_argument("--bench-budget-s", type=float, default=30.0,
                    help="seconds of timing per model; slow models get fewer runs (default 30)")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model (default 600)")
    ap.add_argument("--mem-gb", type=float, default=12.0, help="address-space cap per model process (default 12)")
    ap.add_argument("--log-dir", type=Path, help="per-model stderr logs (default: a new temp folder)")
    ap.add_argument("--note", action="append", help="an extra note line for the table (repeatable)")
    ap.add_argument("--section", help="write a separate, named table (its own markers in --out) instead of the "
                                      "main one, e.g. for families measured in another run")
    ap.add_argument("--render", action="store_true", help="only re-render --out from an existing --json file")
    ap.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return child_main(args)
    try:
        import timm  # noqa: F401
        import torch_pruning  # noqa: F401
    except ImportError:
        ap.error("timm and Torch-Pruning are needed: pip install -e '.[bench]'")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
