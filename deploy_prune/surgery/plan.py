"""Choosing which channels to remove, given per-channel scores.

Kept counts follow Li et al.'s code: ``keep = int(n * (1 - ratio))`` (it truncates), then

* never fewer than one channel (and never below ``1 - max_layer_ratio`` of the group);
* rounded to the nearest multiple of ``round_to`` (ONNX Runtime's CPU kernels block channels by 8 on AVX2
  and 16 on AVX-512, tensor cores want multiples of 8; 64→31 channels ran at half the speed of 64→32), and of
  a GroupNorm's group count where one scales the channels; a group smaller than ``round_to`` is not pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deploy_prune.criteria.base import Criterion
from deploy_prune.surgery.graph import DependencyGraph, Group


@dataclass(frozen=True)
class PlanConfig:
    ratio: float
    round_to: int = 1
    max_layer_ratio: float = 0.9
    layer_ratios: dict[str, float] = field(default_factory=dict)  # per producer layer (from sensitivity)


def kept_count(n: int, ratio: float, cfg: PlanConfig, multiple_of: int = 1) -> int:
    """How many of ``n`` channels a group keeps at ``ratio`` (see the module docstring)."""
    if ratio <= 0 or n <= 1:
        return n
    step = math.lcm(max(1, cfg.round_to), max(1, multiple_of))
    keep = int(n * (1 - ratio) + 1e-9)
    keep = max(keep, 1, math.ceil(n * (1 - cfg.max_layer_ratio) - 1e-9))
    if step > 1:
        if n <= step:
            return n
        keep = max(step, int(round(keep / step)) * step)
    return min(keep, n)


def _group_ratio(group: Group, cfg: PlanConfig) -> float:
    if cfg.layer_ratios:
        rs = [cfg.layer_ratios[m] for m in group.modules if m in cfg.layer_ratios]
        return min(rs) if rs else 0.0
    return cfg.ratio


def _lowest(scores: torch.Tensor, n_remove: int) -> list[int]:
    # stable: ties broken by channel order, so the same scores always give the same choice
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return order[:n_remove]


def select(graph: DependencyGraph, criterion: Criterion, cfg: PlanConfig) -> set[int]:
    """Return the channel roots to remove."""
    removed: set[int] = set()
    if criterion.scope == "global" and not cfg.layer_ratios:
        scored = [(g, criterion.score(graph, g, frozenset())) for g in graph.groups]
        if not scored:
            return removed
        allv = torch.cat([s.float().reshape(-1) for _, s in scored])
        k = int(len(allv) * cfg.ratio)
        if k <= 0:
            return removed
        thr = torch.sort(allv).values[k - 1]
        for g, s in scored:
            below = int((s.float() <= thr).sum())
            share = below / g.size
            keep = kept_count(g.size, share, cfg, g.multiple_of) if below else g.size
            removed.update(g.channels[i].root for i in _lowest(s, g.size - keep))
        return removed
    for g in graph.groups:
        keep = kept_count(g.size, _group_ratio(g, cfg), cfg, g.multiple_of)
        if keep >= g.size:
            continue
        s = criterion.score(graph, g, frozenset(removed))
        if s.shape != (g.size,):
            raise ValueError(f"criterion {criterion.name} returned {tuple(s.shape)} scores for {g.size} channels")
        removed.update(g.channels[i].root for i in _lowest(s, g.size - keep))
    return removed
