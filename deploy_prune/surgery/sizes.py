"""Channel sizes that the code writes as literals but a module stores: split sizes and slice bounds.

A traced graph holds ``torch.split(x, [16, 32], 1)`` or ``x[:, :24]`` with the numbers baked in, so after pruning
the old offsets would cut the narrower tensor in the wrong places. When those numbers are attributes of the
module whose ``forward`` runs the op (MixNet's ``MixedConv2d.splits``, Res2Net's ``Bottle2neck.width``, DPN's
``num_1x1_c``, CSPNet's ``expand_chs`` halved), the pruned model stays correct if each attribute is rewritten to
the number of surviving channels before the old offset. :func:`find_size_attr` finds that attribute and proves
that the op reads it: it re-traces the module with the attribute changed and checks that the literal in the graph
changes with it. A :class:`SizeSite` records what to rewrite; ``apply.prune_channels`` rewrites it, and so does
:func:`~deploy_prune.surgery.apply.replay` on a freshly built model, which is how ``pruned.pt`` rebuilds these
architectures without code from the file.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

_DELTA = 7919  # added to a candidate attribute to see whether the traced literal follows it (an unlikely size)
_MAX_SCALE = 16


@dataclass
class SizeSite:
    """An attribute that holds channel sizes the forward writes into a split or slice.

    After pruning, value ``i`` is the number of surviving positions in ``parts[i]`` (times ``scale``): a split's
    part widths, or the number of channels before a slice bound.
    """

    node: str  # the fx node that reads it (for messages)
    owner: str  # qualified name of the module that stores it ('' = the root)
    attr: str
    scale: int  # the attribute holds ``scale`` times the literal (CSPNet: ``split(self.expand_chs // 2)``)
    parts: list[torch.Tensor]  # labels whose surviving count gives each value
    slots: list[int] | None = None  # for a list/tuple attribute: the entry each part sets (others unchanged)

    def new_value(self, kept: Callable[[torch.Tensor], int], old: Any) -> Any:
        vals = [kept(p) * self.scale for p in self.parts]
        if self.slots is None:
            return vals[0]
        new = list(old)
        for slot, v in zip(self.slots, vals):
            new[slot] = v
        return type(old)(new)


def _literal_key(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and v and all(type(i) is int for i in v):
        return ("seq", tuple(v))
    return ("int", v) if type(v) is int else None


def _literals(nodes: list[fx.Node]) -> set[Any]:
    """Every int, int sequence and slice bound written into these nodes' arguments."""
    found: set[Any] = set()

    def visit(a: Any) -> None:
        if isinstance(a, slice):
            for b in (a.start, a.stop):
                if type(b) is int:
                    found.add(("int", b))
            return
        k = _literal_key(a)
        if k is not None:
            found.add(k)
        if isinstance(a, (list, tuple)):
            for v in a:
                visit(v)

    for n in nodes:
        for a in (*n.args, *n.kwargs.values()):
            visit(a)
    return found


def _nth(gm: fx.GraphModule, op: str, target: Any, k: int) -> list[fx.Node]:
    same = [n for n in gm.graph.nodes if n.op == op and n.target == target]
    return same[k:k + 1]


class _Call(nn.Module):
    """Calls ``m`` on one input, so tracing goes through ``m.__call__`` (which honours a forward that ``__init__``
    picked per instance, as FasterNet's ``Partial_conv3`` does; ``fx`` alone would trace the class's)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Any) -> Any:
        return self.m(x)


def _trace(module: nn.Module) -> fx.GraphModule | None:
    from deploy_prune.surgery.graph import _Tracer  # graph.py imports this module

    root = _Call(module)
    try:
        return fx.GraphModule(root, _Tracer().trace(root))
    except Exception:  # noqa: BLE001 - a module that does not trace on its own cannot be probed: not rewritable
        return None


def find_size_attr(owner: nn.Module, literal: int | list[int], site: tuple[str, Any, int],
                   cache: dict[Any, Any] | None = None) -> tuple[str, int] | None:
    """The attribute of ``owner`` that its forward turns into ``literal``, as ``(name, scale)`` with
    ``attribute == scale * literal``; None if there is no such attribute or more than one candidate follows it.

    ``site`` is ``(op, target, k)``: the literal is an argument of the ``k``-th node with that op and target in
    ``owner``'s forward. Candidates are the module's own int (or int list) attributes equal to ``literal`` (or,
    for an int, a small multiple of it). Each is confirmed by tracing a shallow copy of ``owner`` with the
    attribute moved by a large prime and finding the moved literal in that same node; the model itself is never
    changed.
    """
    is_list = isinstance(literal, (list, tuple))
    key = (id(owner), tuple(literal) if is_list else literal, site)
    if cache is not None and key in cache:
        return cache[key]
    cands: list[tuple[str, int]] = []
    for attr, val in vars(owner).items():
        if attr.startswith("_"):
            continue
        if is_list:
            if isinstance(val, (list, tuple)) and list(val) == list(literal) and all(type(v) is int for v in val):
                cands.append((attr, 1))
        elif type(val) is int and literal > 0:
            if val == literal:
                cands.append((attr, 1))
            elif val > literal and val % literal == 0 and val // literal <= _MAX_SCALE:
                cands.append((attr, val // literal))
    confirmed = []
    for attr, scale in cands:
        old = getattr(owner, attr)
        probe = copy.copy(owner)  # shares submodules and weights; the attribute changes on the copy only
        for k, v in vars(owner).items():  # a forward chosen at init (``self.forward = self.forward_split_cat``)
            if isinstance(v, types.MethodType) and v.__self__ is owner:
                object.__setattr__(probe, k, types.MethodType(v.__func__, probe))
        if is_list:
            object.__setattr__(probe, attr, type(old)(v + _DELTA for v in old))
            expected = ("seq", tuple(v + _DELTA for v in literal))
        else:
            object.__setattr__(probe, attr, old + scale * _DELTA)
            expected = ("int", literal + _DELTA)
        gm = _trace(probe)
        if gm is not None and expected in _literals(_nth(gm, *site)):
            confirmed.append((attr, scale))
    result = confirmed[0] if len(confirmed) == 1 else None
    if cache is not None:
        cache[key] = result
    return result
