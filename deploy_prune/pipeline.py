"""The only module that knows the stage order: prune → finetune → export → clean → verify → benchmark → report.

Everything is written to a private staging folder beside ``--out`` and moved into place at the very end, so
a failed or interrupted run leaves no half-written bundle, and inputs are only ever read.
"""

from __future__ import annotations

import copy
import math
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput, ParityError
from deploy_prune.loading import DEFAULT_INPUT_SHAPE, LoadedModel, load_model, save_pruned
from deploy_prune.metrics import count_macs, count_nonzero, count_params
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, removed_plan, select
from deploy_prune.unstructured import apply_masks, make_permanent

CRITERIA = ("l1", "slimming", "fpgm", "apoz", "lottery", "random")
KINDS = ("dense", "unstructured", "structured")
FILES = {"dense": "dense.onnx", "unstructured": "unstructured.onnx", "structured": "model.onnx"}


@dataclass
class RunOptions:
    """Everything ``deploy-prune run`` takes (see ``deploy-prune run --help`` for each option's meaning)."""

    model: str
    criterion: str = "l1"
    ratio: float = 0.5
    weights: str | None = None
    arch: str | None = None
    data: str | None = None
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 64
    input_shape: tuple[int, ...] | None = None
    provider: str = "auto"
    out: Path = Path("deploy-prune-out")
    force: bool = False
    seed: int = 0
    trust_pickle: bool = False
    bench_iters: int = 100
    threads: int | None = None
    round_to: int = 8
    ignore: tuple[str, ...] = ()
    max_layer_ratio: float = 0.9
    scope: str | None = None
    steps: int = 1
    l1_mode: str = "independent"
    sparsity: float = 1e-4
    sparsity_epochs: int = 2
    calib_batches: int = 8
    lottery_rounds: int = 3
    lottery_scope: str = "global"
    rewind_iter: int = 0
    reinit_control: bool = False
    layer_ratios: dict[str, float] = field(default_factory=dict)
    progress: bool = True


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` → (1, 3, 224, 224)."""
    try:
        dims = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise BadInput(f"--input-shape {text!r} is not a shape; write it like 1x3x224x224") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise BadInput(f"--input-shape {text!r} needs at least two positive dims, e.g. 1x3x224x224")
    return dims


class _Stages:
    """Prints one line per stage to stderr (the CLI's progress; tqdm bars sit under each)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.i, self.t0 = enabled, total, 0, time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.i += 1
        if self.enabled:
            print(f"[{self.i}/{self.total}] {msg}  ({time.perf_counter() - self.t0:.0f}s)", file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        if self.enabled:
            print(f"      {msg}", file=sys.stderr, flush=True)


def _check_out(out: Path, force: bool, inputs: list[str | None]) -> None:
    out = out.resolve()
    for p in inputs:
        if p and not p.startswith(("torchvision:", "builtin:", "mnist5k")):
            src = Path(p.split("imagefolder:", 1)[-1]).resolve()
            if src == out or out in src.parents:
                raise BadInput(f"--out {out} contains the input {p}; choose an --out outside your inputs")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(f"--out {out} is not empty; choose another directory or pass --force to replace it")


def validate(opts: RunOptions) -> None:
    """Cheap checks of every option, before any work starts."""
    if opts.criterion not in CRITERIA:
        raise BadInput(f"unknown criterion {opts.criterion!r}: choose one of {', '.join(CRITERIA)}")
    if not (0 <= opts.ratio < 1) or math.isnan(opts.ratio):
        raise BadInput(f"--ratio {opts.ratio} is out of range: use 0 <= ratio < 1 (0.5 removes half the channels)")
    if opts.epochs < 0:
        raise BadInput("--epochs must be >= 0")
    if opts.steps < 1:
        raise BadInput("--steps must be >= 1")
    if opts.bench_iters < 1:
        raise BadInput("--bench-iters must be >= 1")
    if opts.round_to < 1:
        raise BadInput("--round-to must be >= 1")
    if opts.scope not in (None, "local", "global"):
        raise BadInput(f"--scope {opts.scope!r}: choose local (ratio of every layer) or global (one threshold)")
    if not 0 < opts.max_layer_ratio < 1:
        raise BadInput("--max-layer-ratio must be between 0 and 1 (exclusive)")
    if opts.l1_mode not in ("independent", "greedy"):
        raise BadInput(f"--l1-mode {opts.l1_mode!r}: choose independent or greedy")
    if opts.criterion in ("apoz", "lottery") and not opts.data:
        need = "calibration data to count zero activations" if opts.criterion == "apoz" else "data to train tickets"
        raise BadInput(f"--criterion {opts.criterion} needs {need}: pass --data mnist5k or --data imagefolder:DIR")
    _check_out(opts.out, opts.force, [opts.model, opts.weights, opts.data])


def check_runs(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Raise BadInput unless ``model`` runs on an input of ``shape``."""
    try:
        with torch.no_grad():
            model(torch.zeros(*shape))
    except Exception as exc:  # noqa: BLE001 - any failure here means the shape (or the model) is wrong
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"the model does not run on an input of shape {'x'.join(map(str, shape))} ({first}); "
                       "pass the shape it expects with --input-shape") from None


def _accuracy(model: nn.Module, data: Any) -> float | None:
    if data is None:
        return None
    from deploy_prune.train import evaluate

    return round(float(evaluate(model, data.val)), 2)


def _finetune(model: nn.Module, data: Any, opts: RunOptions, desc: str, epochs: int | None = None,
              after_step: Callable[[nn.Module], None] | None = None) -> None:
    epochs = opts.epochs if epochs is None else epochs
    if data is None or epochs <= 0:
        return
    from deploy_prune.train import train

    lr = opts.lr if opts.lr is not None else 1e-3
    train(model, data.train, epochs=epochs, lr=lr, optimizer="adam", weight_decay=0.0, after_step=after_step,
          seed=opts.seed, desc=desc, progress=opts.progress)


def _compose(kept: dict[str, list[int]], widths: dict[str, int], step_plan: dict[str, list[int]]) -> None:
    """Fold one step's removals (indices in the current widths) into original-index kept lists."""
    for name, gone in step_plan.items():
        cur = kept.setdefault(name, list(range(widths[name])))
        drop = set(gone)
        kept[name] = [orig for i, orig in enumerate(cur) if i not in drop]


def _structured(model: nn.Module, opts: RunOptions, shape: tuple[int, ...], data: Any, artifacts: dict[str, Any],
                *, ratio: float | None = None, criterion: str | None = None,
                finetune: bool = True) -> tuple[nn.Module, dict[str, list[int]], dict]:
    """Prune ``model`` (in place) in ``opts.steps`` steps; returns (model, kept per layer, info)."""
    from deploy_prune.criteria import ScoreContext, create

    ratio = opts.ratio if ratio is None else ratio
    name = criterion or opts.criterion
    widths = analyze(model, shape, ignore=opts.ignore).layer_widths()
    kept: dict[str, list[int]] = {}
    info: dict[str, Any] = {"skipped_layers": {}, "accuracy_before_finetune": None, "steps": []}
    step_keep = (1 - ratio) ** (1 / opts.steps)
    for step in range(opts.steps):
        graph = analyze(model, shape, ignore=opts.ignore)
        if step == 0:
            info["skipped_layers"] = dict(graph.skipped)
            info["groups"] = len(graph.groups)
        crit_opts = {"l1_mode": opts.l1_mode} if name in ("l1", "lottery") else {}
        crit = create(name, **crit_opts)
        ctx = ScoreContext(data=data, seed=opts.seed + step,
                           options={"l1_mode": opts.l1_mode, "sparsity": opts.sparsity,
                                    "sparsity_epochs": opts.sparsity_epochs, "calib_batches": opts.calib_batches,
                                    "progress": opts.progress})
        crit.prepare(model, graph, ctx)
        if step == 0:
            artifacts.update(ctx.artifacts)
        if ctx.artifacts.get("retrained"):
            graph = analyze(model, shape, ignore=opts.ignore)  # weights changed, the structure did not
        cfg = PlanConfig(ratio=1 - step_keep, round_to=opts.round_to,
                         max_layer_ratio=opts.max_layer_ratio, layer_ratios=opts.layer_ratios, scope=opts.scope)
        removed = select(graph, crit, cfg)
        step_plan = removed_plan(graph, removed)
        cur_widths = graph.layer_widths()
        prune_channels(model, graph, removed)
        _compose(kept, widths, step_plan)
        acc = _accuracy(model, data) if finetune else None
        if step == 0:
            info["accuracy_before_finetune"] = acc
        if finetune:
            _finetune(model, data, opts, f"finetune structured (step {step + 1}/{opts.steps})")
        info["steps"].append({"step": step + 1, "params": count_params(model), "accuracy_pruned": acc,
                              "accuracy_finetuned": _accuracy(model, data) if finetune and data else None,
                              "layers_changed": len(step_plan), "widths_before": sum(cur_widths.values())})
    return model, {k: v for k, v in kept.items() if len(v) != widths[k]}, info | {"widths": widths}


def _match_structured(dense: nn.Module, target_nonzero: int, opts: RunOptions, shape: tuple[int, ...],
                      data: Any, artifacts: dict) -> tuple[nn.Module, dict[str, list[int]], dict, float]:
    """L1 prune with the ratio whose non-zero count is closest to ``target_nonzero`` (lottery's structured twin)."""
    lo, hi = 0.0, min(0.95, opts.max_layer_ratio)
    best: tuple[float, dict, dict, int] | None = None
    single = RunOptions(**{**opts.__dict__, "steps": 1})
    for _ in range(12):
        mid = (lo + hi) / 2
        m, kept, info = _structured(copy.deepcopy(dense), single, shape, None, {}, ratio=mid, criterion="l1",
                                    finetune=False)
        nz = count_nonzero(m)
        # closest from below, so the ticket can be trimmed to exactly the same budget
        if nz <= target_nonzero and (best is None or nz > best[3]):
            best = (mid, kept, info, nz)
        if nz > target_nonzero:
            lo = mid
        else:
            hi = mid
    if best is None:
        raise BadInput("no structured prune of this model is as small as the ticket; lower --ratio or raise "
                       "--max-layer-ratio")
    ratio = best[0]
    model, kept, info = _structured(copy.deepcopy(dense), single, shape, data, artifacts, ratio=ratio,
                                    criterion="l1")
    return model, kept, info, ratio


def run(opts: RunOptions) -> dict[str, Any]:
    """Run the whole pipeline and write the bundle at ``opts.out``; returns the report dict."""
    validate(opts)
    from deploy_prune import bench as benchmod
    from deploy_prune import export as exportmod
    from deploy_prune import report as reportmod

    say = _Stages(opts.progress, 6)
    provider = benchmod.resolve_provider(opts.provider)
    torch.manual_seed(opts.seed)
    # Everything a user can get wrong is checked before the first progress line, so a bad input prints
    # exactly one line.
    loaded: LoadedModel = load_model(opts.model, weights=opts.weights, arch=opts.arch, trust_pickle=opts.trust_pickle)
    data = None
    if opts.data:
        from deploy_prune.data import load_data

        data = load_data(opts.data, batch_size=opts.batch_size, seed=opts.seed, input_shape=opts.input_shape)
    shape = opts.input_shape or (data.input_shape if data else None) or loaded.input_shape or DEFAULT_INPUT_SHAPE
    shape = tuple(shape)
    if data is not None and loaded.num_classes is not None and loaded.num_classes != data.num_classes:
        raise BadInput(f"the model predicts {loaded.num_classes} classes but --data {opts.data} has "
                       f"{data.num_classes}; finetune the classifier first or pass matching data")
    dense = loaded.model.eval()
    check_runs(dense, shape)
    say(f"loaded {opts.model}" + (f" and {opts.data}" if opts.data else ""))
    for n in loaded.notes:
        say.note(n)
    artifacts: dict[str, Any] = {}
    dense_acc = _accuracy(dense, data)
    if dense_acc is not None:
        say.note(f"dense accuracy: {dense_acc:.2f}%")

    # ---- prune ----
    lottery_info: dict[str, Any] | None = None
    if opts.criterion == "lottery":
        from deploy_prune.criteria.lottery import find_ticket

        say(f"lottery: iterative magnitude pruning to {opts.ratio:.0%} sparsity in {opts.lottery_rounds} rounds")
        res = find_ticket(copy.deepcopy(dense), data, target_sparsity=opts.ratio, rounds=opts.lottery_rounds,
                          scope=opts.lottery_scope, rewind_iter=opts.rewind_iter,
                          epochs_per_round=max(1, opts.epochs), lr=opts.lr or 1.2e-3, optimizer="adam",
                          seed=opts.seed, progress=opts.progress, reinit_control=opts.reinit_control)
        unstructured = res.model
        lottery_info = {"history": res.history, "reinit_accuracy": getattr(res, "reinit_accuracy", None)}
        say("structured: L1 matched to the ticket's non-zero count")
        structured, kept, info, matched = _match_structured(dense, count_nonzero(unstructured), opts, shape, data,
                                                            artifacts)
        info["matched_ratio"] = round(matched, 4)
        # Channel counts move in steps, so the closest structured model sits a little below the ticket's
        # budget; the ticket's smallest surviving weights are trimmed to the same count (contract: within 1%).
        # The trimmed ticket then gets the same finetuning budget as its structured twin, masks live.
        ticket_nonzero = count_nonzero(unstructured)
        lottery_info["ticket_accuracy"] = _accuracy(unstructured, data)
        apply_masks(unstructured, count_nonzero(structured))
        unstructured_before = _accuracy(unstructured, data)
        _finetune(unstructured, data, opts, "finetune trimmed ticket")
        make_permanent(unstructured)
        lottery_info["ticket_nonzero"] = ticket_nonzero
        lottery_info["trimmed_to_match"] = ticket_nonzero - count_nonzero(unstructured)
    else:
        say(f"pruning with {opts.criterion} at ratio {opts.ratio} ({opts.steps} step(s))")
        structured, kept, info = _structured(copy.deepcopy(dense), opts, shape, data, artifacts)
        target = count_nonzero(structured)
        say(f"unstructured: magnitude masks to {target:,} non-zero weights")
        unstructured = copy.deepcopy(dense)
        apply_masks(unstructured, target)  # live masks: finetuning cannot revive a pruned weight
        unstructured_before = _accuracy(unstructured, data)
        _finetune(unstructured, data, opts, "finetune unstructured")
        make_permanent(unstructured)
    structured.eval()
    unstructured.eval()
    variants = {"dense": dense, "unstructured": unstructured, "structured": structured}

    staging = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.resolve().parent))
    try:
        # ---- export, clean, verify ----
        say("exporting to ONNX, cleaning with onnx-graphsurgeon, checking parity with ONNX Runtime")
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(opts.seed))
        inputs = [example, torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(opts.seed + 1))]
        if data is not None:
            real, _ = next(iter(data.val))
            inputs.append(real[: max(1, min(8, len(real)))])
        cleanup: dict[str, Any] = {}
        parity: dict[str, Any] = {}
        raw = staging / "raw"
        raw.mkdir()
        for kind in KINDS:
            path = staging / FILES[kind]
            exportmod.export_onnx(variants[kind], raw / FILES[kind], example)
            cleanup[kind] = exportmod.cleanup_onnx(raw / FILES[kind], path)
            parity[kind] = exportmod.parity(path, variants[kind], inputs)
        shutil.rmtree(raw)
        bad = [k for k in KINDS if not parity[k]["ok"]]
        if bad:
            detail = "; ".join(f"{k}: max|diff| {parity[k]['max_abs_diff']:.3g} (rel {parity[k].get('max_rel_diff', 0):.3g})"
                               for k in bad)
            raise ParityError(f"ONNX Runtime disagrees with PyTorch for {', '.join(bad)} ({detail}); "
                              "nothing was written")

        # ---- benchmark ----
        say(f"benchmarking dense vs unstructured vs structured on {provider} ({opts.bench_iters} iterations each)")
        result = benchmod.benchmark({k: staging / FILES[k] for k in KINDS}, shape, provider=provider,
                                    threads=opts.threads, iters=opts.bench_iters, seed=opts.seed,
                                    progress=opts.progress)

        # ---- report and bundle ----
        say("writing the report and the bundle")
        accs = {"dense": dense_acc, "unstructured": _accuracy(unstructured, data),
                "structured": _accuracy(structured, data)}
        dense_p50 = result.stats["dense"].p50
        variants_out = []
        for kind in KINDS:
            m = variants[kind]
            st = result.stats[kind]
            variants_out.append({
                "kind": kind, "onnx": FILES[kind], "params": count_params(m), "nonzero_params": count_nonzero(m),
                "macs": count_macs(m, shape), "onnx_bytes": exportmod.onnx_size(staging / FILES[kind]),
                "latency_ms": st.to_dict(), "speedup_vs_dense": round(dense_p50 / st.p50, 4),
                "accuracy": accs[kind],
                "parity": {"max_abs_diff": float(parity[kind]["max_abs_diff"]), "ok": bool(parity[kind]["ok"])},
            })
        import onnxruntime

        layers = [{"name": n, "out_channels_before": info["widths"][n], "out_channels_after": len(k), "kept": k}
                  for n, k in kept.items()]
        report: dict[str, Any] = {
            "schema_version": 1, "model": opts.model, "criterion": opts.criterion,
            "ratio": opts.ratio if not opts.layer_ratios else _removed_fraction(kept, info["widths"]),
            "input_shape": list(shape),
            "environment": {"provider": result.provider, "onnxruntime": onnxruntime.__version__,
                            "torch": torch.__version__, "intra_op_threads": int(result.threads),
                            "python": platform.python_version(), "machine": platform.machine(),
                            "processor": benchmod.cpu_name()},
            "variants": variants_out, "layers": layers,
            "arch": loaded.arch, "data": opts.data, "seed": opts.seed, "round_to": opts.round_to,
            "steps": opts.steps, "epochs": opts.epochs if data is not None else 0,
            "accuracy_before_finetune": {"structured": info.get("accuracy_before_finetune"),
                                         "unstructured": unstructured_before},
            "cleanup": cleanup, "skipped_layers": info.get("skipped_layers", {}),
            "bench": {"method": result.method, "iters": opts.bench_iters},
            "notes": loaded.notes + ([] if data is not None else
                                     ["accuracy unknown: no --data given, so no finetuning and no evaluation"]),
        }
        if opts.layer_ratios:
            report["layer_ratios"] = dict(opts.layer_ratios)
            report["notes"].append("per-layer ratios from --from-sensitivity replaced --ratio; `ratio` is the share "
                                   "of all channels removed")
        if lottery_info is not None:
            report["lottery"] = lottery_info | {"matched_structured_ratio": info.get("matched_ratio")}
        if info.get("steps") and opts.steps > 1:
            report["schedule"] = info["steps"]
        extras: dict[str, Any] = {"plots": []}
        if "gamma_hist" in artifacts:
            from deploy_prune.criteria.slimming import plot_gamma_hist

            plot_gamma_hist(artifacts["gamma_hist"], staging / "gamma_hist.png")
            extras["plots"].append("gamma_hist.png")
            report["gamma_hist"] = artifacts["gamma_hist"]
        for k, v in artifacts.items():
            if k != "gamma_hist":
                report.setdefault("criterion_details", {})[k] = v
        report["verdict"] = reportmod.verdict(report)
        save_pruned(staging / "pruned.pt", structured, arch=loaded.arch, num_classes=loaded.num_classes,
                    input_shape=shape, plan=_plan_from_kept(kept, info["widths"]))
        reportmod.write_report(staging, report, result, extras)
        _move_into_place(staging, opts.out, opts.force)
        staging = None  # type: ignore[assignment]
        return report
    finally:
        if staging is not None and Path(staging).exists():
            shutil.rmtree(staging, ignore_errors=True)


def _removed_fraction(kept: dict[str, list[int]], widths: dict[str, int]) -> float:
    """The share of all producer channels removed (the effective ratio when per-layer ratios were given)."""
    total = sum(widths.values())
    gone = sum(widths[n] - len(k) for n, k in kept.items())
    return round(gone / total, 4) if total else 0.0


def _plan_from_kept(kept: dict[str, list[int]], widths: dict[str, int]) -> dict[str, list[int]]:
    return {n: sorted(set(range(widths[n])) - set(k)) for n, k in kept.items()}


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    out = out.resolve()
    if out.exists():
        if any(out.iterdir()) and not force:
            raise BadInput(f"--out {out} became non-empty during the run; pass --force to replace it")
        trash = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(trash)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)
