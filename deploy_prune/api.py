"""The Python API: prune with deploy-prune, finetune with your own recipe, export, verify and benchmark.

``import deploy_prune as dp`` gives the three calls of the contract (docs/api.md has a complete example)::

    res = dp.prune(model, example_input, criterion="l1", ratio=0.5)   # or target_speedup=2.0
    ...                                                                # your training loop on res.model
    dp.export(res.model, example_input, "model.onnx")                  # export + cleanup + parity gate
    dp.benchmark(["dense.onnx", "model.onnx"])                         # interleaved ORT benchmark

They run the same stages as ``deploy-prune run`` and raise the same exceptions, whose ``str()`` is the CLI's
one-line message with API keyword names in place of flags (``ratio`` rather than ``--ratio``).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput, ParityError, is_out_of_memory, opt, out_of_memory
from deploy_prune.timing import BenchResult

__all__ = ["PruneResult", "ExportResult", "prune", "export", "benchmark", "load"]


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: the pruned copy (the model you passed is never modified); an ordinary ``nn.Module`` with
            narrower layers, in the train/eval mode and on the device of the model you passed.
        plan: the pruning decision as plain JSON data (``json.dumps(res.plan)`` works): ``{"format":
            "deploy-prune/plan/v2", "widths": {layer: original output width}, "kept": {layer: [surviving
            output-channel indices, ascending]}}`` for every layer that lost channels, in the original numbering.
        skipped: layers the analysis left (partly) alone, with the reason (``{qualified name: reason}``).
        params_before, params_after, macs_before, macs_after: counted at the example input's shape.
        ratio: the fraction of prunable channels removed (the effective one when a target was given).
        target: with ``target_speedup`` / ``target_latency``: what the search measured (its probes, the
            chosen widths' measured speedup or latency); None otherwise.
    """

    model: nn.Module
    plan: dict[str, Any]
    skipped: dict[str, str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    ratio: float
    target: dict[str, Any] | None = None

    def layers(self) -> list[dict[str, Any]]:
        """One row per pruned layer, as in ``report.json``'s ``layers``: name, widths before/after, kept."""
        return [{"name": n, "out_channels_before": self.plan["widths"][n], "out_channels_after": len(k), "kept": k}
                for n, k in self.plan["kept"].items()]


@dataclass
class ExportResult:
    """What :func:`export` returns.

    Attributes:
        path: the cleaned, verified ONNX file (with a ``<path>.data`` sidecar only for weights over ~1.8 GB).
        parity: ``{"max_abs_diff", "max_rel_diff", "ok", "ref_max_abs", "note"}``: ONNX Runtime vs PyTorch on
            the example input and a random batch of 2 (``ok`` is always True here: a failure raises).
        cleanup: onnx-graphsurgeon's node counts before and after cleanup.
        onnx_bytes: the file's size (with its sidecar, if any).
    """

    path: Path
    parity: dict[str, Any]
    cleanup: dict[str, Any]
    onnx_bytes: int
    notes: list[str] = field(default_factory=list)


def _example(example_input: Any, what: str = "example_input") -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor):
        raise BadInput(f"{opt(what)} must be a torch.Tensor batch (e.g. torch.randn(1, 3, 224, 224)), got "
                       f"{type(example_input).__name__}")
    if example_input.dim() < 2 or example_input.shape[0] < 1 or not example_input.is_floating_point():
        raise BadInput(f"{opt(what)} must be a floating-point batch with a batch dimension, e.g. shape (1, 3, 224, "
                       f"224); got {tuple(example_input.shape)} {example_input.dtype}")
    return example_input.detach().cpu()


def _module(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise BadInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


class _Loader:
    """A user's iterable of (inputs, labels) batches, in the shape the criteria expect (``.train``/``.val``)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.train = self.val = loader


def _data(data: Any, shape: tuple[int, ...], batch_size: int, seed: int) -> Any:
    if data is None:
        return None
    if isinstance(data, str):
        from deploy_prune.data import load_data

        return load_data(data, batch_size=batch_size, seed=seed, input_shape=shape)
    if hasattr(data, "train") and hasattr(data, "val"):
        return data
    if hasattr(data, "__iter__"):
        return _Loader(data)
    raise BadInput(f"{opt('data')} must be a data spec (mnist5k, imagefolder:DIR) or an iterable of (inputs, "
                   f"labels) batches such as a DataLoader, got {type(data).__name__}")


def prune(model: nn.Module, example_input: torch.Tensor, *, criterion: str = "l1", ratio: float | None = None,
          target_speedup: float | None = None, target_latency: float | None = None, data: Any = None,
          round_to: int | str | None = None, max_layer_ratio: float = 0.9, scope: str | None = None,
          ignore: Sequence[str] = (), seed: int = 0, provider: str = "cpu", threads: int | None = None,
          batch_size: int = 64, progress: bool = False, **criterion_options: Any) -> PruneResult:
    """Remove channels from a copy of ``model``; the model you pass is not modified.

    Args:
        model: any ``nn.Module`` whose ``forward`` torch.fx can trace (a zoo model or your own).
        example_input: one input batch (its shape is what the analysis, MACs and a latency target use).
        criterion: ``l1``, ``slimming``, ``fpgm``, ``apoz`` or ``random`` (docs/criteria.md). ``lottery``
            finds an unstructured ticket, not a channel plan: use the command line for it.
        ratio: fraction of prunable channels to remove, 0 <= ratio < 1 (default 0.5 without a target).
        target_speedup: instead of ``ratio``: prune until the model's p50 on ONNX Runtime (``provider``,
            ``threads``, the example's shape) is this many times faster than the original's.
        target_latency: the same, as an absolute p50 in milliseconds.
        data: what a criterion needs data for (``apoz``'s calibration, ``slimming``'s sparsity training): a
            spec (``"mnist5k"``, ``"imagefolder:DIR"``), an object with ``.train``/``.val`` loaders, or any
            iterable of ``(inputs, labels)`` batches such as your DataLoader.
        round_to: kept channel counts are a multiple of this (``"auto"`` measures which step pays). None:
            ``"auto"`` with a target, else 8.
        max_layer_ratio: never remove more than this fraction of one layer group.
        scope: ``"local"`` or ``"global"`` (None: the criterion's own).
        ignore: layers (qualified names, or prefixes ending in ``.``) never to prune.
        seed: every random choice is seeded from it.
        provider, threads: where a latency target (or ``round_to="auto"``) is measured.
        batch_size: batch size when ``data`` is a spec.
        progress: show progress bars on stderr.
        **criterion_options: the criterion's own options (e.g. ``l1_mode="layer"``, ``calib_batches=8``).

    Returns:
        A :class:`PruneResult`: ``.model``, ``.plan`` (JSON-serialisable) and what the analysis decided.

    Raises:
        BadInput: an unknown criterion or option, a ratio out of range, both a ratio and a target, missing data
            a criterion needs, a model that does not run on ``example_input``, or weights that are not finite.
        UnsupportedModel: the model cannot be traced.
        TargetUnreachable: a latency target beyond what the planner's limits allow (says the best reachable).
    """
    from deploy_prune import criteria
    from deploy_prune.loading import check_finite
    from deploy_prune.metrics import count_macs, count_params
    from deploy_prune.prune import prune_structured, resolve_round_to
    from deploy_prune.spec import PruneSpec, Target, TrainSpec, default_round_to
    from deploy_prune.target import Measure
    from deploy_prune.train import Trainer

    model = _module(model)
    x = _example(example_input)
    shape = tuple(int(d) for d in x.shape)
    targets = [t for t in (("speedup", target_speedup), ("latency_ms", target_latency)) if t[1] is not None]
    if len(targets) + (ratio is not None) > 1:
        raise BadInput(f"{opt('ratio')}, {opt('target_speedup')} and {opt('target_latency')} exclude each other; "
                       "give one of them")
    if criterion == "lottery":
        raise BadInput("lottery finds an unstructured ticket, not a channel plan, so prune() cannot return it: "
                       f"choose {opt('criterion')} l1, slimming, fpgm, apoz or random, or compare tickets with the "
                       "deploy-prune run command")
    options = criteria.make_options(criterion, dict(criterion_options))
    target = Target(*targets[0]) if targets else None
    spec = PruneSpec(criterion=criterion, options=options, ratio=ratio, target=target,
                     round_to=default_round_to(target) if round_to is None else round_to,
                     max_layer_ratio=max_layer_ratio, scope=scope, ignore=tuple(ignore), seed=seed)
    if spec.needs_data and data is None:
        raise BadInput(f"{opt('criterion')} {criterion} needs {criteria.get(criterion).data_use}: pass {opt('data')} "
                       "(a DataLoader of (inputs, labels), or mnist5k / imagefolder:DIR)")
    check_finite(model, "model")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    work = copy.deepcopy(model).cpu().eval()
    _check_runs(work, x)
    bundle = _data(data, shape, batch_size, seed)
    trainer = Trainer(bundle, TrainSpec(epochs=0, batch_size=batch_size), seed, progress)
    measure = Measure(provider, threads, seed=seed, progress=progress)
    params_before, macs_before = count_params(work), count_macs(work, shape)
    if spec.round_to == "auto":
        spec, _ = resolve_round_to(work, spec, shape, measure, lambda _: None)
    pruned = prune_structured(work, spec, shape, trainer, finetune=False,
                              measure=measure if spec.target is not None else None)
    params_after, macs_after = count_params(pruned.model), count_macs(pruned.model, shape)
    eff = spec.ratio if spec.ratio is not None else pruned.plan.removed_fraction()
    return PruneResult(model=pruned.model.to(device).train(was_training), plan=pruned.plan.to_json(),
                       skipped=dict(pruned.skipped), params_before=params_before, params_after=params_after,
                       macs_before=macs_before, macs_after=macs_after, ratio=float(eff),
                       target=pruned.target.report() if pruned.target is not None else None)


def _check_runs(model: nn.Module, x: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure here means the input (or the model) is wrong
        if is_out_of_memory(exc):
            raise out_of_memory(exc, "example_input") from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"the model does not run on {opt('example_input')} of shape {tuple(x.shape)} ({first}); "
                       "pass an input of the shape it expects") from None


def export(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, provider: str = "cpu",
           inputs: Sequence[torch.Tensor] | None = None, seed: int = 0) -> ExportResult:
    """Export ``model`` to ONNX, clean the graph with onnx-graphsurgeon and prove it on ONNX Runtime.

    The file has one input ``input`` with a dynamic batch dimension and one output ``logits``. The graph is
    checked against PyTorch on ``example_input``, a seeded random batch of 2 of the same shape and any extra
    ``inputs``, with tolerances relative to the output's scale (docs/onnx-runtime.md); a model whose output is
    identically zero is checked at its classifier's input. Nothing is written at ``path`` unless parity holds.

    Args:
        model: the model to export (not modified; its mode and device are restored).
        example_input: an input batch of the shape the model takes.
        path: the ``.onnx`` file to write (parent folders are created; an existing file is replaced).
        provider: the ONNX Runtime provider parity runs on (``cpu``, ``cuda``, ``auto``).
        inputs: more batches to check parity on (real images are a better test than random ones).
        seed: seeds the random parity batch.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ParityError: ONNX Runtime's output differs from PyTorch's (nothing is written).
        BadInput: weights that are not finite, an output that is zero and cannot be checked otherwise, or a
            bad ``example_input``.
        DeployPruneError: the exporter failed (the message names the operation).
    """
    from deploy_prune.export import cleanup_onnx, export_onnx, onnx_size, parity, parity_failure, sidecar_of
    from deploy_prune.loading import check_finite

    model = _module(model)
    x = _example(example_input)
    check_finite(model, "model")
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    batches = [x, torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(seed))]
    batches += [_example(b, "inputs") for b in (inputs or ())]
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        export_onnx(model, work / "raw.onnx", x)
        cleanup = cleanup_onnx(work / "raw.onnx", work / dst.name)
        par = parity(work / dst.name, model, batches, provider=provider)
        if not par["ok"]:
            disagrees, detail = parity_failure(par)
            verb = "disagrees with" if disagrees else "could not be checked against"
            raise ParityError(f"ONNX Runtime {verb} PyTorch for {dst.name} ({detail}); nothing was written")
        side = sidecar_of(work / dst.name)
        if side.exists():
            side.replace(sidecar_of(dst))
        else:
            sidecar_of(dst).unlink(missing_ok=True)
        (work / dst.name).replace(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = [par["note"]] if par.get("note") else []
    return ExportResult(dst, par, cleanup, onnx_size(dst), notes)


def benchmark(paths: Sequence[str | Path], *, input_shape: Sequence[int] | None = None, provider: str = "cpu",
              iters: int = 100, threads: int | None = None, seed: int = 0, progress: bool = False) -> BenchResult:
    """Time ONNX files against each other in one interleaved ONNX Runtime run (``deploy-prune bench``).

    Variants alternate in blocks of 10 runs (the first 2 of each block dropped), every session is created up
    front and warmed up, thread spinning is off; docs/benchmarking.md explains why.

    Args:
        paths: the ``.onnx`` files; the first is the baseline by convention. They must take the same input.
        input_shape: the input's shape (default: read from the first file, dynamic dims = 1).
        provider: ``cpu``, ``cuda`` (fails if CUDA cannot run) or ``auto``.
        iters: kept timed runs per file.
        threads: intra-op threads per session (default: all cores).
        seed: seeds the random input.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`BenchResult`: ``.stats[name]`` (p50, p90, p99, mean, std, min, n in ms; ``name`` is the file
        stem), ``.speedups(baseline)``, ``.provider`` that really ran, ``.method`` (one sentence).

    Raises:
        BadInput: no files, a missing or non-ONNX file, files that take different inputs, a bad shape.
    """
    from deploy_prune.bench import bench_files

    if isinstance(paths, (str, Path)):
        paths = [paths]
    return bench_files([Path(p) for p in paths], tuple(input_shape) if input_shape is not None else None,
                       provider=provider, threads=threads, iters=iters, seed=seed, progress=progress)


def load(model: str | Path, *, weights: str | Path | None = None, arch: str | None = None,
         trust_pickle: bool = False, seed: int = 0) -> nn.Module:
    """Build a model the way ``deploy-prune run MODEL`` does, e.g. a bundle's ``pruned.pt`` to finetune.

    Args:
        model: a ``pruned.pt`` (rebuilt from its recorded architecture and plan, ``weights_only=True``), a
            ``{"arch", "state_dict"}`` or bare state_dict checkpoint, or ``torchvision:NAME`` /
            ``builtin:NAME`` / ``timm:NAME`` (random init unless ``weights``).
        weights: a state_dict file for a ``torchvision:``/``builtin:``/``timm:`` model.
        arch: the architecture of a bare state_dict (guessed for torchvision/builtin ones when omitted).
        trust_pickle: allow a pickled whole module (runs code from the file).
        seed: seeds a random initialisation.

    Returns:
        The module, in eval mode, on the CPU.

    Raises:
        BadInput: an unknown spec, an unreadable or untrusted file, weights that do not fit or are not finite.
    """
    from deploy_prune.loading import load_model

    return load_model(str(model), weights=str(weights) if weights is not None else None, arch=arch,
                      trust_pickle=trust_pickle, seed=seed).model
