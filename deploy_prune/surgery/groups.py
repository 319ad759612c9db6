"""Channels and groups: the result of the dependency analysis that criteria score and the planner chooses from.

After label propagation (propagate.py), each union-find class of elements is one prunable :class:`Channel`
unless it touches something blocked; a :class:`Group` is a set of channels tied together through their
producer layers (a residual stage, a single conv, a concat branch).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn as nn

from deploy_prune.surgery.ops import CONV, varying_dims, vector

if TYPE_CHECKING:
    from deploy_prune.surgery.graph import DependencyGraph




@dataclass(frozen=True)
class Channel:
    """One prunable channel: every member below is removed together.

    Attributes:
        root: the union-find class id (stable for one analysis).
        producers: ``(module, output index)`` of each conv/linear layer that writes this channel.
        norms: ``(module, index)`` of each norm layer (BN/LN/GN/IN) that scales this channel.
        relus: ``(fx node, dim, index)`` where this channel is the input of a ReLU (APoZ reads these).
    """

    root: int
    producers: tuple[tuple[str, int], ...]
    norms: tuple[tuple[str, int], ...] = ()
    relus: tuple[tuple[str, int, int], ...] = ()


@dataclass
class Group:
    """Channels coupled through their producer layers; the unit a per-layer ratio applies to."""

    id: int
    modules: tuple[str, ...]
    channels: list[Channel]
    multiple_of: int = 1  # kept *channel* count must be a multiple of this (GroupNorm groups)
    channels_per_class: int = 1  # channels each class removes from one layer (a grouped conv's group count)
    grouped: bool = False  # classes span the groups of a grouped conv: the class count is each group's width

    @property
    def size(self) -> int:
        """The number of channel *classes* (what criteria score and the planner counts)."""
        return len(self.channels)

    @property
    def width(self) -> int:
        """The number of output channels each producer layer of the group has."""
        return self.size * self.channels_per_class


def build_groups(g: DependencyGraph) -> None:
    el = g.el
    # Consistency: a position read by a consumer maps to one class (already unioned in _read).
    # Parameters read with get_attr: the entries of each class must form whole slices along one dim.
    for p in g.params.values():
        roots = el.roots(p.ids)
        if p.ids.numel() == 0:
            continue
        vd = varying_dims(roots)
        if len(vd) > 1:
            el.block(p.ids, f"tensor '{p.name}' is coupled to channels along several dims")
    # A module attribute read by several splits/slices gets one value: they must count the same classes.
    by_attr: dict[tuple[str, str], list] = {}
    for site in g.size_sites:
        by_attr.setdefault((site.owner, site.attr), []).append(site)
    for (owner, attr), sites in by_attr.items():
        sigs = {(s.scale, tuple(tuple(sorted(Counter(el.roots(p).tolist()).items())) for p in s.parts))
                for s in sites}
        if len(sigs) > 1:
            for s in sites:
                for p in s.parts:
                    el.block(p, f"attribute '{attr}' of module '{owner or type(g.model).__name__}' sizes "
                                "differently pruned tensors")
    # class -> members
    producers: dict[int, list[tuple[str, int]]] = {}
    for name in g.order:
        for i, r in enumerate(el.roots(g.producer_ids[name]).tolist()):
            producers.setdefault(r, []).append((name, i))
    blocked_roots = el.blocked_roots()
    # parts of a split / slices that must keep at least one channel (a conv cannot read zero channels)
    # and every producer layer (a branch of a concat that feeds a wider residual group must keep a channel)
    keep_sets = {frozenset(el.roots(labels).tolist()) for labels, _ in g.keep_one}
    keep_sets |= {frozenset(el.roots(ids).tolist()) for ids in g.producer_ids.values()}
    g.keep_sets = sorted((k for k in keep_sets if not any(r in blocked_roots for r in k)),
                         key=lambda k: (len(k), min(k)))
    norms: dict[int, list[tuple[str, int]]] = {}
    for c in g.consumers:
        if c.role in ("norm", "dw"):
            for i, r in enumerate(el.roots(c.labels).tolist()):
                norms.setdefault(r, []).append((c.name, i))
    relus: dict[int, list[tuple[str, int, int]]] = {}
    for s in g.relu_sites:
        vd = varying_dims(s.labels)
        if vd and vd != [s.dim]:
            continue
        for i, r in enumerate(el.roots(vector(s.labels, s.dim)).tolist()):
            relus.setdefault(r, []).append((s.node, s.dim, i))
    # GroupNorm: kept channels must stay divisible by num_groups
    gn_groups: dict[str, int] = {c.name: g.model.get_submodule(c.name).num_groups for c in g.consumers
                                 if isinstance(g.model.get_submodule(c.name), nn.GroupNorm)}
    # classes read by, or written by, a grouped conv (its relative positions are coupled across groups)
    grouped_roots = {r for c in g.consumers if c.role == "grouped" for r in el.roots(c.labels).tolist()}
    whole = {c.name for c in g.consumers if c.role == "groups"}  # pruned by whole groups: rounded as usual
    grouped_mods = {n for n in g.order if isinstance(g.model.get_submodule(n), CONV) and n not in whole
                    and 1 < g.model.get_submodule(n).groups < g.model.get_submodule(n).in_channels}
    # producer modules tied together through shared classes
    parent = {m: m for m in g.order}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for members in producers.values():
        for (a, _), (b, _) in zip(members, members[1:]):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
    comps: dict[str, list[str]] = {}
    for m in g.order:
        comps.setdefault(find(m), []).append(m)
    gid = 0
    for mods in comps.values():
        roots = sorted({r for m in mods for r in el.roots(g.producer_ids[m]).tolist()},
                       key=lambda r: _first_index(producers[r], mods))
        chans = [Channel(r, tuple(producers[r]), tuple(norms.get(r, ())), tuple(relus.get(r, ())))
                 for r in roots if r not in blocked_roots]
        if not chans:
            why = next((blocked_roots[r] for r in roots if r in blocked_roots), "no prunable channels")
            for m in mods:
                g.skipped[m] = why
            continue
        mult = 1
        for r in roots:
            for n, _ in norms.get(r, ()):
                mult = max(mult, gn_groups.get(n, 1))
        partial = [blocked_roots[r] for r in roots if r in blocked_roots]
        if partial:
            for m in mods:
                g.skipped.setdefault(m, f"{len(partial)} of {len(roots)} channels kept: {partial[0]}")
        per_layer = {sum(1 for mm, _ in c.producers if mm == m) for c in chans for m in mods}
        per_class = max(per_layer) if len(per_layer - {0}) == 1 else 1
        grouped = bool(grouped_mods & set(mods)) or any(c.root in grouped_roots for c in chans)
        g.groups.append(Group(gid, tuple(mods), chans, mult, per_class, grouped))
        gid += 1


def _first_index(members: list[tuple[str, int]], mods: list[str]) -> tuple[int, int]:
    order = {m: i for i, m in enumerate(mods)}
    return min((order.get(m, len(order)), i) for m, i in members)
