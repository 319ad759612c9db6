"""``random``: uniformly random channel scores, the control every pruning comparison needs.

**Equation.** ``s_j ~ U[0, 1)`` independently per channel, drawn from a ``torch.Generator`` seeded with
``seed * 1_000_003 + group.id`` (``seed`` = the run's ``--seed``, from ``ctx.seed``). The same seed therefore
always removes the same channels, each group gets its own stream (adding a group does not reshuffle the
others), and the global torch RNG is never touched. Scope: local (``ratio`` of every group), the
"random filters" baseline of Li et al. (Fig. 2) and Blalock et al.'s recommended control.

**Options.** None: the seed is the run's (``PruneSpec.seed``), handed over in ``ctx.seed``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from deploy_prune.criteria.base import BaseCriterion, ScoreContext, register
from deploy_prune.surgery.graph import DependencyGraph, Group

_STREAM = 1_000_003  # a prime, so (seed, group) pairs map to distinct generator seeds for any realistic sizes


@register
class RandomCriterion(BaseCriterion):
    """Seeded uniform scores; see the module docstring."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "uniformly random channels (the control)"
    seed: int = 0

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None:
        self.seed = ctx.seed

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * _STREAM + group.id)
        return torch.rand(group.size, generator=gen)
