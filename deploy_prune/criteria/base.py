"""The criterion protocol and its registry.

A criterion turns the channels of one :class:`~deploy_prune.surgery.graph.Group` into scores, one per
channel, **lower = pruned first**. The planner (:mod:`deploy_prune.surgery.plan`) decides how many to remove.

* ``scope = "local"``: the planner walks groups in graph order and removes ``ratio`` of each group.
  ``score`` receives the set of channel roots already removed upstream, which greedy L1 uses.
* ``scope = "global"``: all channels are ranked against one threshold (Network Slimming).
* ``prepare`` runs once before scoring with the model, the analysis and the run context: slimming's
  sparsity training and APoZ's calibration pass live there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput
from deploy_prune.surgery.graph import DependencyGraph, Group


@dataclass
class ScoreContext:
    """What a criterion may use besides the weights.

    Attributes:
        data: a :class:`deploy_prune.data.DataBundle` or None when the user gave no ``--data``.
        seed: the run's seed (every random choice is seeded from it).
        options: criterion options from the CLI (e.g. ``l1_mode``, ``sparsity``, ``sparsity_epochs``,
            ``calib_batches``).
        artifacts: what a criterion wants in the report (e.g. slimming's gamma histograms); free-form,
            JSON-serialisable.
    """

    data: Any = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)


class Criterion(Protocol):
    name: ClassVar[str]
    needs_data: ClassVar[bool]
    scope: ClassVar[str]

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None: ...

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor: ...


_CRITERIA: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a criterion to the registry (a duplicate name is a programming error)."""
    if cls.name in _CRITERIA:
        raise ValueError(f"criterion {cls.name!r} already registered by {_CRITERIA[cls.name].__module__}")
    _CRITERIA[cls.name] = cls
    return cls


def create(name: str, **options: Any) -> Criterion:
    if name not in _CRITERIA:
        raise BadInput(f"unknown criterion {name!r}: choose one of {', '.join(names())}")
    return _CRITERIA[name](**options)


def names() -> list[str]:
    return sorted(_CRITERIA)
