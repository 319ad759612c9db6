"""Typed, frozen descriptions of what a run should do, and the plan it decides.

* :class:`PruneSpec`: how to prune (criterion and its options, ratio or latency target, planner limits).
  Validated once, when it is made; nothing downstream re-checks or re-parses it.
* :class:`PrunePlan`: which output channels of each layer survive, in the original numbering. It is the one
  form of a pruning decision: surgery applies it, ``pruned.pt`` stores it, the report lists it.
* :class:`RunSpec` and its parts: everything ``deploy-prune run`` takes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deploy_prune.errors import BadInput, opt

PLAN_FORMAT = "deploy-prune/plan/v2"
DEFAULT_RATIO = 0.5
TARGET_BAND = 1.1  # a speedup target X is met by a measured speedup in [X, 1.1 X]


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` → (1, 3, 224, 224)."""
    try:
        dims = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise BadInput(f"{opt('input_shape')} {text!r} is not a shape; write it like 1x3x224x224") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise BadInput(f"{opt('input_shape')} {text!r} needs at least two positive dims, e.g. 1x3x224x224")
    return dims


# ----------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class PrunePlan:
    """The surviving output channels of every layer that loses some, in the original model's numbering.

    Attributes:
        widths: the original output width of every producer layer the analysis saw (conv/linear).
        kept: for each layer that loses channels, the surviving output-channel indices, ascending.
    """

    widths: Mapping[str, int]
    kept: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        widths = {str(k): int(v) for k, v in self.widths.items()}
        kept: dict[str, tuple[int, ...]] = {}
        for name, idx in self.kept.items():
            if name not in widths:
                raise ValueError(f"plan keeps channels of layer '{name}', whose width it does not record")
            k = tuple(sorted({int(i) for i in idx}))
            if not k or k[0] < 0 or k[-1] >= widths[name]:
                raise ValueError(f"plan for layer '{name}' keeps indices outside 0..{widths[name] - 1}")
            if len(k) < widths[name]:
                kept[name] = k
        object.__setattr__(self, "widths", MappingProxyType(widths))
        object.__setattr__(self, "kept", MappingProxyType(kept))

    @classmethod
    def empty(cls, widths: Mapping[str, int]) -> PrunePlan:
        return cls(widths, {})

    @classmethod
    def from_removed(cls, removed: Mapping[str, Iterable[int]], widths: Mapping[str, int]) -> PrunePlan:
        """From ``{layer: removed output indices}`` (the format of ``pruned.pt`` v1)."""
        kept = {}
        for name, gone in removed.items():
            if name not in widths:
                raise ValueError(f"the pruning plan names layer '{name}', which this architecture lacks")
            drop = set(int(i) for i in gone)
            kept[name] = [i for i in range(widths[name]) if i not in drop]
        return cls(widths, kept)

    def removed(self) -> dict[str, list[int]]:
        """``{layer: removed output indices}`` for every layer that loses channels."""
        return {n: sorted(set(range(self.widths[n])) - set(k)) for n, k in self.kept.items()}

    def width_after(self, name: str) -> int:
        return len(self.kept[name]) if name in self.kept else self.widths[name]

    def then(self, step: PrunePlan) -> PrunePlan:
        """Compose with a later step whose indices count the channels this plan keeps."""
        kept: dict[str, tuple[int, ...]] = dict(self.kept)
        for name, idx in step.kept.items():
            cur = self.kept.get(name, tuple(range(self.widths[name])))
            kept[name] = tuple(cur[i] for i in idx)
        return PrunePlan(self.widths, kept)

    def removed_fraction(self) -> float:
        """The share of all producer channels removed."""
        total = sum(self.widths.values())
        gone = sum(self.widths[n] - len(k) for n, k in self.kept.items())
        return round(gone / total, 4) if total else 0.0

    def layers(self) -> list[dict[str, Any]]:
        """The report's ``layers`` rows."""
        return [{"name": n, "out_channels_before": self.widths[n], "out_channels_after": len(k), "kept": list(k)}
                for n, k in self.kept.items()]

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "widths": dict(self.widths), "kept": {n: list(k) for n, k in self.kept.items()}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PrunePlan:
        if obj.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a {PLAN_FORMAT} plan (format {obj.get('format')!r})")
        return cls(obj["widths"], obj["kept"])

    def digest(self) -> str:
        """A short hash of the plan, equal on every process that decided the same plan."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# how to prune


@dataclass(frozen=True)
class Target:
    """A latency goal: ``speedup`` (dense p50 / structured p50) or ``latency_ms`` (structured p50)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("speedup", "latency_ms"):
            raise ValueError(f"unknown target kind {self.kind!r}")
        name = "target_speedup" if self.kind == "speedup" else "target_latency"
        if not math.isfinite(self.value) or self.value <= 0 or (self.kind == "speedup" and self.value <= 1):
            need = "a speedup > 1 (2 = twice as fast as dense)" if self.kind == "speedup" else "milliseconds > 0"
            raise BadInput(f"{opt(name)} {self.value} is out of range: give {need}")


ALLOCATION_CHOICES = ("auto", "latency", "importance", "uniform")


@dataclass(frozen=True, kw_only=True)
class PruneSpec:
    """How to prune. Frozen and validated when made.

    Attributes:
        criterion: a registered criterion name (``deploy_prune.criteria.names()``).
        options: the criterion's options (an instance of its ``Options`` class); None = its defaults.
        ratio: fraction of prunable channels to remove (lottery: of weights); excludes ``target``.
        target: a latency goal instead of a ratio.
        layer_ratios: per producer layer ratios (from a sensitivity sweep); replace ``ratio``.
        round_to: kept channel counts are rounded to a multiple of this; ``"auto"`` measures which step pays
            on the run's provider (:func:`deploy_prune.latency.choose_step`).
        max_layer_ratio: never remove more than this fraction of one group.
        scope: ``"local"``, ``"global"`` or None (the criterion's own).
        ignore: layers (qualified names, or prefixes ending in '.') never to prune.
        steps: prune (and finetune) iteratively in this many steps.
        seed: every random choice is seeded from it.
        allocation: with a target, how the widths are shared out between layer groups: ``latency``
            (importance x MACs per measured ms), ``importance`` (importance per ms), ``uniform`` (the same
            fraction everywhere), or ``auto`` (with data: each is searched for the target and the most accurate
            after BatchNorm re-estimation wins; without data: ``latency``, then ``uniform``, then ``importance``
            as fallbacks while no probe lands in the middle of the band, and an in-band ``latency`` model
            challenged by ``uniform``'s points keeping more MACs; the most MACs in the band wins).
    """

    criterion: str = "l1"
    options: Any = None
    ratio: float | None = None
    target: Target | None = None
    layer_ratios: Mapping[str, float] = field(default_factory=dict)
    round_to: int | str = 8
    max_layer_ratio: float = 0.9
    scope: str | None = None
    ignore: tuple[str, ...] = ()
    steps: int = 1
    seed: int = 0
    allocation: str = "auto"

    def __post_init__(self) -> None:
        from deploy_prune import criteria  # the registry; imported late because criteria import surgery

        cls = criteria.get(self.criterion)
        if self.options is None:
            object.__setattr__(self, "options", cls.Options())
        elif not isinstance(self.options, cls.Options):
            raise BadInput(f"criterion {self.criterion} takes {cls.Options.__name__}, not "
                           f"{type(self.options).__name__}")
        if self.ratio is not None and self.target is not None:
            raise BadInput(f"{opt('ratio')} and a latency target exclude each other; give one of them")
        if self.ratio is None and self.target is None:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        if self.ratio is not None and (not 0 <= self.ratio < 1 or math.isnan(self.ratio)):
            raise BadInput(f"{opt('ratio')} {self.ratio} is out of range: use 0 <= ratio < 1 (0.5 removes half "
                           "the channels)")
        object.__setattr__(self, "layer_ratios", MappingProxyType({str(k): float(v)
                                                                   for k, v in self.layer_ratios.items()}))
        if self.round_to != "auto" and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                        or self.round_to < 1):
            raise BadInput(f"{opt('round_to')} {self.round_to!r} must be an integer >= 1 or auto")
        if not 0 < self.max_layer_ratio < 1:
            raise BadInput(f"{opt('max_layer_ratio')} must be between 0 and 1 (exclusive)")
        if self.scope not in (None, "local", "global"):
            raise BadInput(f"{opt('scope')} {self.scope!r}: choose local (ratio of every layer) or global (one "
                           "threshold)")
        if self.steps < 1:
            raise BadInput(f"{opt('steps')} must be >= 1")
        if self.allocation not in ALLOCATION_CHOICES:
            raise BadInput(f"{opt('allocation')} {self.allocation!r}: choose one of {', '.join(ALLOCATION_CHOICES)}")
        if self.target is not None and self.layer_ratios:
            raise BadInput("per-layer ratios from a sensitivity sweep and a latency target exclude each other")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def needs_data(self) -> bool:
        """Whether the criterion cannot run without data (``Criterion.needs_data``)."""
        from deploy_prune import criteria

        return criteria.get(self.criterion).needs_data

    def with_(self, **changes: Any) -> PruneSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------
# the whole run


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """The MODEL argument and what goes with it."""

    spec: str
    weights: str | None = None
    arch: str | None = None
    trust_pickle: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Finetuning (and evaluation) settings; ``deploy_prune.train.recipe`` and ``.bn`` explain the recipe.

    Attributes:
        epochs: finetune epochs after pruning (per step of ``--steps``).
        lr: base learning rate; None = the optimizer's default (2e-3 for adamw, 1e-3 for adam, 1e-2 for sgd).
        batch_size: for finetuning, evaluation and BatchNorm re-estimation.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9).
        weight_decay: on conv/linear weights only; None = the optimizer's default (1e-2 / 0 / 1e-4).
        lr_schedule: ``cosine`` (to 0 over each finetuning run) or ``constant``, after the warm-up.
        warmup_epochs: linear warm-up length in epochs (at most half the run); 0 = none.
        distill: distil from the dense model (Hinton et al. 2015) while finetuning.
        distill_temperature, distill_alpha: T and the soft term's weight alpha.
        bn_recalib_batches: training batches to re-estimate BatchNorm statistics on after every surgery;
            0 = off (the head refit too).
        head_refit: after re-estimation, refit the classifier (the Linear producing the output, and any
            Linear whose inputs were narrowed) to the dense model's outputs by least squares on the same batches
            (``deploy_prune.train.headfit``).
    """

    epochs: int = 3
    lr: float | None = None
    batch_size: int = 64
    optimizer: str = "adamw"
    weight_decay: float | None = None
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.3
    distill: bool = True
    distill_temperature: float = 4.0
    distill_alpha: float = 0.5
    bn_recalib_batches: int = 50
    head_refit: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise BadInput(f"{opt('epochs')} must be >= 0")
        if self.batch_size < 1:
            raise BadInput(f"{opt('batch_size')} must be >= 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInput(f"{opt('lr')} must be a positive number")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise BadInput(f"{opt('optimizer')} {self.optimizer!r}: choose adamw, adam or sgd")
        if self.weight_decay is not None and not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise BadInput(f"{opt('weight_decay')} must be a number >= 0")
        if self.lr_schedule not in ("cosine", "constant"):
            raise BadInput(f"{opt('lr_schedule')} {self.lr_schedule!r}: choose cosine or constant")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise BadInput(f"{opt('warmup_epochs')} must be a number >= 0 (0 = no warm-up)")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise BadInput(f"{opt('distill_temperature')} must be a positive number (Hinton et al. use 1-20)")
        if not 0 <= self.distill_alpha <= 1:
            raise BadInput(f"{opt('distill_alpha')} must be between 0 and 1 (the weight of the distillation term)")
        if self.bn_recalib_batches < 0:
            raise BadInput(f"{opt('bn_recalib_batches')} must be >= 0 (0 turns BatchNorm re-estimation off)")


def default_round_to(target: Target | None) -> int | str:
    """``round_to`` when the user gives none: ``"auto"`` with a latency target, else 8.

    A target is a speed on this machine, and a width between two of the kernel's channel blocks costs the next
    block: on an AVX-512 CPU (block 16) the digits' 3x search with steps of 8 kept 10-17% of the MACs and
    scored 95.4 (3 seeds), with steps of 16 it kept 21-25% and scored 96.1 (docs/latency-target-log.md). Without
    a target the widths are the user's ratio, and 8 keeps runs comparable across machines.
    """
    return "auto" if target is not None else 8


BENCH_MIN_SECONDS = 0.5  # what `deploy-prune run` and its target search time each variant for, at least
TARGET_BENCH_SECONDS = 60.0
"""With a latency target, the final benchmark (whose dense/structured ratio decides whether the target was
met) runs at least this long in all: ConvNeXt-T against a pruned copy, six runs each, varied by 3.1%
(coefficient of variation) at 100 iterations (35 s) and by 1.2% at 400 (128 s) on a 2-vCPU VM, against a band
[X, 1.1 X] 10% wide (docs/onnx-runtime.md §3)."""


@dataclass(frozen=True, kw_only=True)
class BenchSpec:
    """Where and how latency is measured."""

    provider: str = "auto"
    iters: int = 100
    threads: int | None = None
    min_seconds: float = BENCH_MIN_SECONDS  # time each variant at least this long (more iterations if fast)
    target_seconds: float = TARGET_BENCH_SECONDS  # with a target: the final benchmark's length in all, at least

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise BadInput(f"{opt('bench_iters')} must be >= 1")
        if not (self.min_seconds >= 0 and math.isfinite(self.min_seconds)):
            raise BadInput(f"{opt('bench_min_seconds')} must be a number of seconds >= 0 (0 = exactly "
                           f"{opt('bench_iters')})")
        if not (self.target_seconds >= 0 and math.isfinite(self.target_seconds)):
            raise BadInput(f"{opt('bench_target_seconds')} must be a number of seconds >= 0 (0 = no floor)")
        if self.threads is not None and self.threads < 1:
            raise BadInput(f"{opt('threads')} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything ``deploy-prune run`` takes (``deploy-prune run --help`` explains each option)."""

    model: ModelSource
    prune: PruneSpec = field(default_factory=PruneSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    bench: BenchSpec = field(default_factory=BenchSpec)
    data: str | None = None
    workers: int = 0  # imagefolder: DataLoader worker processes
    image_size: int | None = None  # imagefolder: square crop size (sets the input shape's H and W)
    skip_bad_images: bool = False  # imagefolder: skip and count unreadable images instead of failing
    input_shape: tuple[int, ...] | None = None
    out: Path = Path("deploy-prune-out")
    force: bool = False
    variants: tuple[str, ...] = ()  # optional variants asked for (e.g. "int8"); dense/unstructured/structured always
    variant_options: Mapping[str, Any] = field(default_factory=dict)  # kind -> its Options instance
    progress: bool = True
    resume: bool = False  # continue the interrupted run of the same arguments at ``out`` (resume.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "variants", tuple(self.variants))
        from deploy_prune import variants as registry

        options = dict(self.variant_options)
        for kind in self.variants:
            registry.selected((kind,))  # unknown kinds are refused here
            if kind not in options:
                options[kind] = registry.make_options(kind, {})
        stray = sorted(set(options) - set(self.variants))
        if stray:
            raise BadInput(f"options were given for the {stray[0]} variant, which this run does not make: add "
                           f"{opt(stray[0])} or drop them")
        object.__setattr__(self, "variant_options", MappingProxyType(options))
        if self.workers < 0:
            raise BadInput(f"{opt('workers')} must be >= 0 (0 decodes images in the main process)")
        if self.image_size is not None and not (self.data or "").lower().startswith("imagefolder:"):
            raise BadInput(f"{opt('image_size')} sets the crop of imagefolder data: pass {opt('data')} "
                           f"imagefolder:DIR, or {opt('input_shape')} for the model's input")
        for kind in self.variants:
            use = registry.get(kind).needs_data
            if use and not self.data:
                raise BadInput(f"{opt(kind)} needs {use}: pass {opt('data')} mnist5k or {opt('data')} "
                               "imagefolder:DIR")
        if self.prune.needs_data and not self.data:
            from deploy_prune import criteria

            use = criteria.get(self.prune.criterion).data_use
            raise BadInput(f"{opt('criterion')} {self.prune.criterion} needs {use}: pass {opt('data')} mnist5k "
                           f"or {opt('data')} imagefolder:DIR")
