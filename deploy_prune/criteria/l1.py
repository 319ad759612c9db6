"""``l1``: filter L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

**Equation.** For output channel j of a conv/linear layer with weight F,
``s_j = sum_{i,k,l} |F_{j,i,k,l}|`` (Li et al. §3.1: the sum of absolute kernel weights of the 3-D filter);
the channels with the smallest ``s_j`` are pruned first. Scope: local (the planner removes ``ratio`` of every
group, Li et al.'s per-layer rule).

**Options** (:class:`L1Options`):

* ``l1_mode`` = ``"independent"`` (default) or ``"greedy"`` (§3.2, Fig. 3). *Independent* sums every input
  kernel, including those reading feature maps already pruned upstream (what the official/RNP
  ``vggprune.py`` does: it scores every layer on the original weights). *Greedy* leaves out the kernels whose
  input channel was already removed earlier in graph order: the planner passes that set as ``removed``, and
  the input channel's class is looked up with ``graph.input_positions`` (so a linear layer reading a
  flattened feature map drops every column of a removed channel).

**Coupled channels.** A group can have several producers (a residual stage: every block's last conv and the
projection shortcut write the same channels). Li et al. §3.3 prune the second conv of a block "at the same
indices" as the projection shortcut, ranked by the *shortcut's* L1. The rule used here: a producer is a
projection shortcut when it is a convolution with a 1x1 (all-ones) kernel and either a stride > 1 or a name
with a component containing ``downsample``, ``shortcut`` or ``proj`` (torchvision's ``layer2.0.downsample.0``
is both). If some but not all producers of a group are shortcuts, a channel's score is the sum over its
shortcut producers only; otherwise (no shortcut, e.g. ResNet's first stage, or only shortcuts) it is the sum
of its producers' filter L1 norms.

**Departures from the paper.** Li et al. prune only conv1 of each CIFAR ResNet block (their option-A
shortcuts are parameter-free); here any group the dependency analysis marks prunable can be pruned, so
sensitivity analysis or ``--ignore`` decides what to skip. Keep counts truncate (``int(n * (1 - ratio))``)
as in their code; see :mod:`deploy_prune.surgery.plan`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from deploy_prune.criteria._util import producer_weight
from deploy_prune.criteria.base import BaseCriterion, CriterionOptions, option, register
from deploy_prune.surgery.graph import DependencyGraph, Group

L1_MODES = ("independent", "greedy")
_SHORTCUT_NAME = re.compile(r"downsample|shortcut|proj")


def filter_l1(graph: DependencyGraph, name: str, removed: frozenset[int] = frozenset()) -> torch.Tensor:
    """Per-output-channel L1 norm of layer ``name``, leaving out input channels whose class is in ``removed``."""
    w = producer_weight(graph, name).abs()
    if removed:
        positions = graph.input_positions(name)
        if positions is not None and w.dim() >= 2 and len(positions) == w.shape[1]:
            keep = torch.tensor([int(r) not in removed for r in positions.tolist()], dtype=torch.bool)
            w = w[:, keep]
    return w.reshape(w.shape[0], -1).sum(dim=1)


def is_projection_shortcut(graph: DependencyGraph, name: str) -> bool:
    """The documented heuristic: a 1x1 convolution with stride > 1 or a shortcut-like name."""
    m = graph.module(name)
    if not isinstance(m, nn.modules.conv._ConvNd) or any(k != 1 for k in m.kernel_size):
        return False
    named = any(_SHORTCUT_NAME.search(part.lower()) for part in name.split("."))
    return named or any(s > 1 for s in m.stride)


def shortcut_producers(graph: DependencyGraph, group: Group) -> frozenset[str]:
    """The group's projection-shortcut producers, or an empty set when none or all of them are shortcuts."""
    found = frozenset(m for m in group.modules if is_projection_shortcut(graph, m))
    return found if 0 < len(found) < len(group.modules) else frozenset()


@dataclass(frozen=True)
class L1Options(CriterionOptions):
    l1_mode: str = option("independent", "l1: independent | greedy (Li et al. 2017, sec. 3.2): greedy leaves out "
                          "kernels reading channels already removed upstream.", choices=L1_MODES)


@register
class L1Criterion(BaseCriterion):
    """Filter L1 norm; see the module docstring for the equation, options and departures."""

    name: ClassVar[str] = "l1"
    summary: ClassVar[str] = "filter L1 norm (Li et al. 2017)"
    Options = L1Options
    options: L1Options

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        excluded = removed if self.options.l1_mode == "greedy" else frozenset()
        norms = {m: filter_l1(graph, m, excluded) for m in group.modules}
        shortcuts = shortcut_producers(graph, group)
        out = torch.empty(group.size)
        for c, ch in enumerate(group.channels):
            use = [(m, i) for m, i in ch.producers if m in shortcuts] or list(ch.producers)
            out[c] = sum(float(norms[m][i]) for m, i in use)
        return out

