"""Channel dependency analysis on a torch.fx trace.

How it works (docs/design.md has the long form):

* Every output channel of every conv/linear layer (a *producer*) is an **element**; so is every entry of a
  parameter or buffer read with ``get_attr`` (ConvNeXt's layer scale, ViT's class token and position
  embedding), and every tensor the analysis cannot see through gets one *blocked* element.
* The traced graph is interpreted on **label tensors**: int64 tensors with the real activation's shape whose
  entries are element ids. Data-movement ops (cat, split, chunk, slicing, permute, reshape, flatten, ...) run
  unchanged on the labels, so concatenation offsets, splits and flatten-into-linear come out exactly.
  Element-wise binary ops (residual adds, squeeze-and-excitation products, position embeddings) *union* the
  elements they combine; consumers (conv/linear inputs, norm layers, depthwise convs) union what they read
  at each input position.
* After the pass, each union-find class is one prunable **channel**: removing it removes every member
  together, so coupled layers stay consistent by construction. A class that touches anything blocked
  (the model's input or output, an op we do not understand, a conv with a channel multiplier...) is left
  alone, and the reason is kept for the report.
* A **group** is a set of classes tied together through their producer layers (a residual stage, a single
  conv, a concat branch); criteria score channels and the planner chooses per group.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from deploy_prune.errors import UnsupportedModel, is_out_of_memory, opt, out_of_memory
from deploy_prune.surgery.groups import Channel, Group, build_groups
from deploy_prune.surgery.ops import CONV, NORM
from deploy_prune.surgery.propagate import Consumer, Param, Propagator, ReluSite

WHOLE_GROUPS_UP_TO = 16
"""A grouped conv with at most this many channels per group is pruned by whole groups (:func:`analyze`)."""
from deploy_prune.surgery.sizes import SizeSite
from deploy_prune.surgery.unionfind import Elements

__all__ = ["Channel", "DependencyGraph", "Group", "analyze", "trace"]


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every norm layer (and subclasses such as ConvNeXt's LayerNorm2d) kept whole, and
    the modules in ``opaque`` too (see :func:`trace`)."""

    def __init__(self, opaque: Iterable[str] = ()) -> None:
        super().__init__()
        self.opaque = set(opaque)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, NORM + CONV + (nn.Linear,)) or qualname in self.opaque:
            return True
        return super().is_leaf_module(m, qualname)


_MAX_OPAQUE = 16


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a model that cannot be traced gets an error naming the op and module.

    A submodule whose forward branches on a traced value (timm's VGG head checks ``x.shape[-2]``) is kept whole
    as one opaque node instead: the analysis treats it as an op it does not understand, so its inputs are left
    unpruned with that reason (``gm.meta["opaque"]``) and the rest of the model is still pruned.
    """
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # noqa: BLE001 - any tracing failure becomes a user-facing message
            where = ""
            stack = getattr(tracer, "module_stack", None)
            names = [k for k in stack.keys() if k] if stack else []
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            inner = str(list(stack.values())[-1][0]) if stack else ""
            if isinstance(exc, fx.proxy.TraceError) and inner and inner not in opaque and len(opaque) < _MAX_OPAQUE:
                opaque[inner] = f"{type(model.get_submodule(inner)).__name__}'s forward branches on a traced value"
                continue
            if names:
                where = f" inside module '{names[-1]}'"
            raise UnsupportedModel(
                f"cannot trace the model{where}: {type(exc).__name__}: {msg[:300]}; channel surgery needs a "
                "torch.fx-traceable forward (no data-dependent Python control flow); wrap the offending code in "
                f"a leaf module or skip it with {opt('ignore')}"
            ) from None
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.meta["opaque"] = opaque
    return gm


# ----------------------------------------------------------------------------------------------------------
# the analysis


class DependencyGraph:
    """The result of :func:`analyze`: groups of coupled channels and how to remove them."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, example_shape: tuple[int, ...]) -> None:
        self.model = model
        self.gm = gm
        self.example_shape = tuple(example_shape)
        self.el = Elements()
        self.producer_ids: dict[str, torch.Tensor] = {}  # module -> element id per output channel
        self.consumers: list[Consumer] = []
        self.params: dict[str, Param] = {}
        self.relu_sites: list[ReluSite] = []
        self.size_sites: list[SizeSite] = []  # module attributes holding split sizes / slice bounds (sizes.py)
        self.keep_one: list[tuple[torch.Tensor, str]] = []  # labels of which at least one must survive (a part)
        self.keep_sets: list[frozenset[int]] = []  # the same, as class roots (build_groups)
        self.groups: list[Group] = []
        self.skipped: dict[str, str] = {}  # producer module -> why none of its channels can be pruned
        self.order: list[str] = []  # producer modules in graph order
        self.whole_groups_up_to = WHOLE_GROUPS_UP_TO  # grouped convs this narrow per group lose whole groups

    # ---- queries used by criteria and the planner ----

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def input_positions(self, name: str) -> torch.Tensor | None:
        """The class root read at each input channel of conv/linear ``name`` (None if it has no record)."""
        for c in self.consumers:
            if c.name == name and c.role == "in":
                return self.el.roots(c.labels)
            if c.name == name and c.role == "grouped":  # the weight's dim 1 holds group 0's positions
                m = self.module(name)
                return self.el.roots(c.labels[: m.in_channels // m.groups])
            if c.name == name and c.role == "groups":  # dim 1 differs per group; a group goes with its inputs
                return None
        return None

    def layer_widths(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.producer_ids.items()}

    def capture(self, x: torch.Tensor, nodes: Iterable[str]) -> dict[str, torch.Tensor]:
        """Run the traced model on ``x`` and return the outputs of the named fx nodes."""
        wanted = set(nodes)
        got: dict[str, torch.Tensor] = {}

        class _Cap(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in wanted:
                    got[n.name] = out.detach()
                return out

        with torch.no_grad():
            _Cap(self.gm).run(x)
        return got


def analyze(model: nn.Module, example: torch.Tensor | tuple[int, ...], *,
            ignore: Iterable[str] = (), whole_groups_up_to: int = WHOLE_GROUPS_UP_TO) -> DependencyGraph:
    """Trace ``model`` and find every group of coupled, prunable channels.

    Args:
        model: the network (it is not modified; it is put in eval mode).
        example: an example input, or its shape (batch 1 is enough).
        ignore: producer layers (qualified names, or prefixes ending in '.') never to prune.
        whole_groups_up_to: a grouped conv with at most this many channels per group (the same in and out)
            is pruned by whole groups; a wider one keeps its group count and loses the same positions in
            every group. 0 prunes every grouped conv by positions.
    """
    model.eval()
    x = example if isinstance(example, torch.Tensor) else torch.randn(*example)
    gm = trace(model)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as exc:  # noqa: BLE001
        if is_out_of_memory(exc):
            raise out_of_memory(exc) from None
        raise UnsupportedModel(
            f"the model does not run on an input of shape {tuple(x.shape)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}; pass the shape it expects with {opt('input_shape')}"
        ) from None
    g = DependencyGraph(model, gm, tuple(x.shape))
    g.whole_groups_up_to = whole_groups_up_to
    Propagator(g).run(x)
    ignore = tuple(ignore)
    for name, ids in g.producer_ids.items():
        if any(name == p or (p.endswith(".") and name.startswith(p)) for p in ignore):
            g.el.block(ids, "ignored on request")
    build_groups(g)
    return g

