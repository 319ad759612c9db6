"""The variants a bundle holds: one registration each.

A :class:`Variant` is made either

* **from a module** (``module(pair, dense)`` returns the PyTorch model): it is exported to ONNX, cleaned with
  onnx-graphsurgeon and checked against PyTorch on ONNX Runtime, and its params, non-zeros, MACs and accuracy
  are counted on the module; or
* **from another variant's ONNX file** (``derive(ctx)`` writes ``ctx.path`` from ``ctx.source_path`` and
  returns the variant's numbers, its own parity included), e.g. ``int8`` from ``structured``.

``dense``, ``unstructured`` and ``structured`` are always made; a variant registered with ``optional=True``
only when the run asks for it (``RunSpec.variants``, e.g. ``--int8``). Every variant made is benchmarked in
the same interleaved run and listed in the report, so adding one is one module plus one :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class DeriveContext:
    """What a derived variant may use.

    Attributes:
        source_path: the cleaned ONNX file of the variant it starts from.
        path: the file to write.
        source_model: the PyTorch module of that variant.
        data: the run's :class:`~deploy_prune.data.DataBundle`, or None.
        input_shape: the run's input shape.
        inputs: the input batches the other variants' parity used.
        provider: the execution provider of the run (``CPUExecutionProvider``...).
        seed: the run's seed.
        progress: whether long steps may show progress bars.
        options: the variant's options (an instance of its ``Options``), or None if it has none.
        threads: ONNX Runtime intra-op threads of the run (None: all cores).
    """

    source_path: Path
    path: Path
    source_model: nn.Module
    data: Any
    input_shape: tuple[int, ...]
    inputs: list[torch.Tensor]
    provider: str
    seed: int
    progress: bool = True
    options: Any = None
    threads: int | None = None


@dataclass
class Derived:
    """What ``derive`` returns: the report numbers of a variant made from another's ONNX file."""

    params: int
    nonzero_params: int
    macs: int
    accuracy: float | None
    parity: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)  # the report's ``variant_details[kind]``
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    """One kind of model in the bundle.

    Attributes:
        kind: the report's ``kind``.
        file: the ONNX file name in the bundle.
        description: one line for the report.
        module: for a variant made from a module: ``(pair, dense) -> nn.Module``.
        derive: for a variant made from another variant's file: ``(DeriveContext) -> Derived``.
        source: the kind whose file ``derive`` starts from.
        optional: made only when the run asks for it (the CLI gets a ``--KIND`` flag).
        color: its colour in the plots.
        Options: a frozen dataclass of the variant's own options, declared with
            :func:`deploy_prune.criteria.option` (the CLI builds their flags), or None.
        needs_data: what the variant needs ``--data`` for (a run asking for it without data is refused
            before anything is trained), or None.
    """

    kind: str
    file: str
    description: str
    module: Callable[[Any, nn.Module], nn.Module] | None = None
    derive: Callable[[DeriveContext], Derived] | None = None
    source: str | None = None
    optional: bool = False
    color: str = "#2ca02c"
    Options: type | None = None
    needs_data: str | None = None

    def __post_init__(self) -> None:
        if (self.module is None) == (self.derive is None):
            raise ValueError(f"variant {self.kind!r} needs exactly one of module= or derive=")
        if self.derive is not None and self.source is None:
            raise ValueError(f"derived variant {self.kind!r} needs source=")


_VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add a variant (a duplicate kind or file is a programming error)."""
    if variant.kind in _VARIANTS:
        raise ValueError(f"variant {variant.kind!r} is already registered")
    if any(v.file == variant.file for v in _VARIANTS.values()):
        raise ValueError(f"another variant already writes {variant.file}")
    if variant.source is not None and variant.source not in _VARIANTS:
        raise ValueError(f"variant {variant.kind!r} derives from unknown variant {variant.source!r}")
    _VARIANTS[variant.kind] = variant
    return variant


def unregister(kind: str) -> None:
    """Remove a registration (for tests that register a toy variant)."""
    _VARIANTS.pop(kind, None)


def get(kind: str) -> Variant:
    return _VARIANTS[kind]


def optional_kinds() -> list[str]:
    return [k for k, v in _VARIANTS.items() if v.optional]


def selected(requested: tuple[str, ...] = ()) -> list[Variant]:
    """The variants a run makes, in registration order: every non-optional one, plus the optional ones asked
    for (and what they derive from)."""
    from deploy_prune.errors import BadInput

    unknown = [k for k in requested if k not in _VARIANTS]
    if unknown:
        raise BadInput(f"unknown variant {unknown[0]!r}: choose from {', '.join(optional_kinds())}")
    wanted = set(requested)
    for k in list(wanted):
        src = _VARIANTS[k].source
        while src is not None:
            wanted.add(src)
            src = _VARIANTS[src].source
    return [v for v in _VARIANTS.values() if not v.optional or v.kind in wanted]


def make_options(kind: str, values: dict[str, Any]) -> Any:
    """Build variant ``kind``'s options from ``values`` (option name → value; missing ones default)."""
    cls = _VARIANTS[kind].Options
    if cls is None:
        if values:
            from deploy_prune.errors import BadInput

            raise BadInput(f"variant {kind} takes no options (got {', '.join(sorted(values))})")
        return None
    return cls(**values)


def color(kind: str) -> str:
    return _VARIANTS[kind].color if kind in _VARIANTS else "#2ca02c"


# ----------------------------------------------------------------------------------------------------------
# the built-ins

register(Variant("dense", "dense.onnx", "the model as given", module=lambda pair, dense: dense, color="#7f7f7f"))
register(Variant("unstructured", "unstructured.onnx",
                 "magnitude masks with the structured model's non-zero count (dense kernels: no speedup expected)",
                 module=lambda pair, dense: pair.unstructured, color="#ff7f0e"))
register(Variant("structured", "model.onnx", "channels removed: the production handoff",
                 module=lambda pair, dense: pair.structured.model, color="#1f77b4"))

# int8 imports no ONNX Runtime until it runs (``import deploy_prune.report`` stays runtime-free).
from deploy_prune import quantize as _quantize  # noqa: E402

register(Variant("int8", "model_int8.onnx",
                 "the structured model statically quantized with ONNX Runtime (QDQ, u8/s8, per-channel weights), "
                 "calibrated on --data's train split; reduce_range chosen from the CPU's VNNI support",
                 derive=_quantize.derive, source="structured", optional=True, color="#9467bd",
                 Options=_quantize.Int8Options, needs_data=_quantize.NEEDS_DATA))
