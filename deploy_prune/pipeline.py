"""The only module that knows the stage order: load → prune → export, clean, verify → benchmark → report.

Everything is written to a private staging folder beside ``--out`` and moved into place at the very end, so
a failed or interrupted run leaves no half-written bundle, and inputs are only ever read.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploy_prune import variants as variants_mod
from deploy_prune.errors import BadInput, DeployPruneError, ParityError, is_out_of_memory, opt, out_of_memory
from deploy_prune.loading import DEFAULT_INPUT_SHAPE, LoadedModel, load_model, save_pruned
from deploy_prune.metrics import count_macs, count_nonzero, count_params
from deploy_prune.outputs import LOGITS, named_outputs
from deploy_prune.prune import PrunedPair, prune_pair
from deploy_prune.spec import RunSpec
from deploy_prune.target import Measure
from deploy_prune.train import Trainer

CONTROL = ("dense", "unstructured")
"""The final benchmark's control pair: the sparse copy runs dense's kernels, so their p50s must agree
(:func:`deploy_prune.bench.benchmark_controlled`)."""


def run(spec: RunSpec) -> dict[str, Any] | None:
    """Run the whole pipeline and write the bundle at ``spec.out``; returns the report dict.

    Under torchrun every rank trains and prunes; rank 0 alone exports, benchmarks and writes, and the other
    ranks return None once rank 0 is done.
    """
    from deploy_prune import bench, distributed, report, resume

    check_out(spec.out, spec.force, [spec.model.spec, spec.model.weights, spec.data])
    say = Stages(spec.progress and distributed.is_main(), 6)
    provider = bench.resolve_provider(spec.bench.provider)
    ws = resume.Workspace.open(spec.out, resume.fingerprint(spec), resume=spec.resume, force=spec.force,
                               note=say.note)
    distributed.broadcast_object(None)  # every rank waits until rank 0 holds the staging folder
    with ws.active(note=say.note):
        # Everything a user can get wrong is checked before the first progress line, so a bad input prints
        # exactly one line.
        inputs = load_inputs(spec)
        say(f"loaded {spec.model.spec}" + (f" and {spec.data}" if spec.data else "")
            + (f" ({distributed.world_size()} data-parallel ranks)" if distributed.active() else ""))
        for n in inputs.loaded.notes:
            say.note(n)
        dense = inputs.loaded.model
        trainer = Trainer(inputs.data, spec.train, spec.prune.seed, spec.progress and distributed.is_main(),
                          teacher=dense)
        known = {"dense": trainer.accuracy(dense)}
        if known["dense"] is not None:
            say.note(f"dense accuracy: {known['dense']:.2f}%")

        measure = Measure(provider, spec.bench.threads, iters=max(20, min(50, spec.bench.iters)),
                          seed=spec.prune.seed, progress=spec.progress, min_seconds=spec.bench.min_seconds,
                          confirm_seconds=spec.bench.target_seconds / 4)
        pair = prune_pair(dense, spec.prune, inputs.shape, trainer, say, measure)
        if not distributed.is_main():
            code = distributed.wait_for_main()  # rank 0 exports, benchmarks and writes alone
            if code:
                raise DeployPruneError(f"rank 0 failed (exit {code})")
            return None
        with distributed.alone():  # rank 0 exports, benchmarks and writes by itself
            stage = ws.bundle
            stage.mkdir(parents=True, exist_ok=True)
            say("exporting to ONNX, cleaning with onnx-graphsurgeon, checking parity with ONNX Runtime")
            chosen = variants_mod.selected(spec.variants)
            made = make_variants(chosen, pair, dense, stage, inputs, trainer, provider, known,
                                 options=spec.variant_options, threads=spec.bench.threads)
            floor = f", each timed for at least {spec.bench.min_seconds:g} s" if spec.bench.min_seconds else ""
            if spec.prune.target is not None and spec.bench.target_seconds:
                floor += (f", for at least {spec.bench.target_seconds:g} s in all: it decides whether the target "
                          "is met")
            say(f"benchmarking {' vs '.join(v.kind for v in chosen)} on {provider} (at least {spec.bench.iters} "
                f"iterations{floor})")
            files = {m.kind: stage / m.file for m in made}
            timing = dict(provider=provider, threads=spec.bench.threads, iters=spec.bench.iters,
                          seed=spec.prune.seed, min_seconds=spec.bench.min_seconds, progress=spec.progress,
                          total_seconds=spec.bench.target_seconds if spec.prune.target is not None else 0.0)
            twins = CONTROL if CONTROL[0] in files and CONTROL[1] in files else None
            result, control = bench.benchmark_controlled(files, inputs.shape, twins,
                                                         reference="dense" if "dense" in files else None,
                                                         say=say.note, **timing)
            tiny = _tiny_model_note(result)
            if tiny:
                say.note(tiny)
            say("writing the report and the bundle")
            env = {**bench.environment(result), "world_size": distributed.world_size()}
            rep = report.build(spec=spec, loaded=inputs.loaded, shape=inputs.shape, pair=pair, made=made,
                               bench=result, environment=env)
            rep["bench"]["control"] = control
            save_pruned(stage / "pruned.pt", pair.structured.model, arch=inputs.loaded.arch,
                        num_classes=inputs.loaded.num_classes, input_shape=inputs.shape, plan=pair.structured.plan)
            report.write_report(stage, rep, result, {"plots": draw_plots(pair, stage)})
            ws.commit(spec.force)
    distributed.main_done(0)
    return rep


def _tiny_model_note(result: Any) -> str | None:
    """A hint when a sub-millisecond model was timed with several CPU threads (docs/onnx-runtime.md §7)."""
    dense = result.stats.get("dense")
    if dense is None or result.provider != "CPUExecutionProvider" or result.threads <= 1 or dense.p50 >= 1.0:
        return None
    return (f"the dense model runs in {dense.p50:.3g} ms: below about a millisecond, waking a second ONNX Runtime "
            f"thread costs more than it saves and makes timings bimodal; --threads 1 is faster and steadier "
            f"(docs/onnx-runtime.md §7)")


# ----------------------------------------------------------------------------------------------------------
# stages


@dataclass
class Inputs:
    loaded: LoadedModel
    data: Any
    shape: tuple[int, ...]


def load_inputs(spec: RunSpec) -> Inputs:
    """Load the model and the data, settle the input shape, and check they fit together."""
    m = spec.model
    loaded = load_model(m.spec, weights=m.weights, arch=m.arch, trust_pickle=m.trust_pickle, seed=spec.prune.seed)
    data = None
    if spec.data:
        from deploy_prune.data import LoaderOptions, load_data

        data = load_data(spec.data, batch_size=spec.train.batch_size, seed=spec.prune.seed,
                         input_shape=spec.input_shape,
                         options=LoaderOptions(workers=spec.workers, image_size=spec.image_size,
                                               skip_bad_images=spec.skip_bad_images, progress=spec.progress))
        loaded.notes.extend(data.notes)  # e.g. how many unreadable images were skipped (report notes)
    shape = tuple(spec.input_shape or (data.input_shape if data else None) or loaded.input_shape
                  or DEFAULT_INPUT_SHAPE)
    loaded.model.eval()
    outs = check_runs(loaded.model, shape)
    if data is not None and (len(outs) > 1 or outs[0][0] != LOGITS):
        raise BadInput(f"{opt('data')} finetunes and scores a classifier, but the model returns "
                       f"{', '.join(n for n, _ in outs)} rather than one logits tensor; drop {opt('data')} (the "
                       "report then says accuracy is unknown) and finetune pruned.pt with your own recipe")
    if data is not None and loaded.num_classes is not None and loaded.num_classes != data.num_classes:
        raise BadInput(f"the model predicts {loaded.num_classes} classes but {opt('data')} {spec.data} has "
                       f"{data.num_classes}; finetune the classifier first or pass matching data")
    return Inputs(loaded, data, shape)


@dataclass
class Made:
    """One variant written to the staging folder, with its report numbers."""

    kind: str
    file: str
    params: int
    nonzero_params: int
    macs: int
    onnx_bytes: int
    accuracy: float | None
    parity: dict[str, Any]
    cleanup: dict[str, Any] | None = None
    details: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


def parity_inputs(shape: tuple[int, ...], data: Any, seed: int) -> list[torch.Tensor]:
    """The batches parity runs on: a seeded random one at ``shape``, one of batch 2, and real images if any."""
    inputs = [torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),
              torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(seed + 1))]
    if data is not None:
        real, _ = next(iter(data.val))
        inputs.append(real[: max(1, min(8, len(real)))])
    return inputs


def make_variants(chosen: list[variants_mod.Variant], pair: PrunedPair, dense: nn.Module, stage: Path,
                  inputs: Inputs, trainer: Trainer, provider: str, known: dict[str, float | None], *,
                  options: Mapping[str, Any] | None = None, threads: int | None = None) -> list[Made]:
    """Write every chosen variant's ONNX file into ``stage`` and check it; raise if any fails parity."""
    from deploy_prune.export import cleanup_onnx, export_onnx, onnx_size, parity

    options = options or {}
    batches = parity_inputs(inputs.shape, inputs.data, trainer.seed)
    modules: dict[str, nn.Module] = {}
    made: list[Made] = []
    raw = stage / "raw"
    for v in chosen:
        path = stage / v.file
        if v.module is not None:
            m = modules[v.kind] = v.module(pair, dense).eval()
            export_onnx(m, raw / v.file, batches[0])
            cleanup = cleanup_onnx(raw / v.file, path)
            acc = known[v.kind] if v.kind in known else trainer.accuracy(m)
            made.append(Made(v.kind, v.file, count_params(m), count_nonzero(m), count_macs(m, inputs.shape),
                             onnx_size(path), acc, parity(path, m, batches), cleanup))
        else:
            assert v.derive is not None and v.source is not None
            ctx = variants_mod.DeriveContext(stage / variants_mod.get(v.source).file, path, modules[v.source],
                                             inputs.data, inputs.shape, batches, provider, trainer.seed,
                                             trainer.progress, options.get(v.kind), threads)
            d = v.derive(ctx)
            made.append(Made(v.kind, v.file, d.params, d.nonzero_params, d.macs, onnx_size(path),
                             d.accuracy, d.parity, None, d.details, tuple(d.notes)))
    shutil.rmtree(raw, ignore_errors=True)
    check_same_outputs(made)
    bad = [m for m in made if not m.parity["ok"]]
    if bad:
        from deploy_prune.export import parity_failure

        failures = {m.kind: parity_failure(m.parity) for m in bad}
        detail = "; ".join(f"{kind}: {text}" for kind, (_, text) in failures.items())
        verb = "disagrees with" if any(d for d, _ in failures.values()) else "could not be checked against"
        raise ParityError(f"ONNX Runtime {verb} PyTorch for {', '.join(m.kind for m in bad)} ({detail}); "
                          "nothing was written")
    return made


def check_same_outputs(made: list[Made]) -> None:
    """Raise unless every variant's ONNX file has the same output names and shapes as the first (dense)."""
    shapes = [(m.kind, {n: r["shape"] for n, r in m.parity["outputs"].items()}) for m in made
              if m.parity.get("outputs")]
    for kind, got in shapes[1:]:
        if got != shapes[0][1]:
            raise DeployPruneError(f"the {kind} model's outputs {got} differ from the {shapes[0][0]} model's "
                                   f"{shapes[0][1]}: pruning changed an output width; nothing was written")


def draw_plots(pair: PrunedPair, stage: Path) -> list[str]:
    """The criterion's own plots (e.g. slimming's gamma histogram), drawn into the staging folder."""
    names = []
    for name, draw in pair.structured.criterion.plots.items():
        draw(stage / name)
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------------
# helpers


class Stages:
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


def check_out(out: Path, force: bool, inputs: list[str | None]) -> None:
    """Refuse an ``out`` that holds an input, is a file, or is not empty (without ``force``)."""
    out = out.resolve()
    for p in inputs:
        if p and not p.startswith(("torchvision:", "builtin:", "timm:", "mnist5k")):
            src = Path(p.split("imagefolder:", 1)[-1]).resolve()
            if src == out or out in src.parents:
                raise BadInput(f"{opt('out')} {out} contains the input {p}; choose an {opt('out')} outside your "
                               "inputs")
    if out.exists() and not out.is_dir():
        raise BadInput(f"{opt('out')} {out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(f"{opt('out')} {out} is not empty; choose another directory or pass {opt('force')} to "
                       "replace it")


def check_runs(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
    """Raise BadInput unless ``model`` runs on an input of ``shape`` and returns what deploy-prune can handle
    (a tensor, or a dict/tuple/list of tensors); returns the named outputs."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(*shape))
    except Exception as exc:  # noqa: BLE001 - any failure here means the shape (or the model) is wrong
        if is_out_of_memory(exc):
            raise out_of_memory(exc) from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"the model does not run on an input of shape {'x'.join(map(str, shape))} ({first}); "
                       f"pass the shape it expects with {opt('input_shape')}") from None
    return named_outputs(out)  # anything but a tensor or a dict/tuple/list of tensors is a one-line BadInput
