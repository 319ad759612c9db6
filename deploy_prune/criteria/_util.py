"""Small helpers shared by the built-in criteria (weight access)."""

from __future__ import annotations

import torch

from deploy_prune.surgery.graph import DependencyGraph

from deploy_prune.train.sparsity import BATCHNORMS  # noqa: F401  (re-exported for the criteria)


def producer_weight(graph: DependencyGraph, name: str) -> torch.Tensor:
    """The raw weight of conv/linear ``name`` as a detached float tensor, output channels first."""
    w = getattr(graph.module(name), "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"producer layer '{name}' has no weight tensor")
    return w.detach().float()
