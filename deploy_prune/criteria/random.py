"""``random``: uniformly random channel scores, the control every pruning comparison needs.

**Equation.** ``s_j ~ U[0, 1)`` independently per channel, drawn from a ``torch.Generator`` seeded with
``seed * 1_000_003 + group.id`` (``seed`` = the run's ``--seed``, from ``ctx.seed``). The same seed therefore
always removes the same channels, each group gets its own stream (adding a group does not reshuffle the
others), and the global torch RNG is never touched. Scope: local (``ratio`` of every group), the
"random filters" baseline of Li et al. (Fig. 2) and Blalock et al.'s recommended control.

**Options.** None; an explicit ``seed`` passed to ``create("random", seed=...)`` overrides ``ctx.seed``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from deploy_prune.criteria._util import int_option
from deploy_prune.criteria.base import ScoreContext, register
from deploy_prune.surgery.graph import DependencyGraph, Group

_STREAM = 1_000_003  # a prime, so (seed, group) pairs map to distinct generator seeds for any realistic sizes


@register
class RandomCriterion:
    """Seeded uniform scores; see the module docstring."""

    name: ClassVar[str] = "random"
    needs_data: ClassVar[bool] = False
    scope: ClassVar[str] = "local"

    def __init__(self, **options: Any) -> None:
        self._options = dict(options)
        self.seed = int_option(self._options, "seed", 0, minimum=0)

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None:
        self.seed = int_option(self._options, "seed", ctx.seed, minimum=0)

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * _STREAM + group.id)
        return torch.rand(group.size, generator=gen)
