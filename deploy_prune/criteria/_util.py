"""Small helpers shared by the built-in criteria (weight access, option parsing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput
from deploy_prune.surgery.graph import DependencyGraph

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def producer_weight(graph: DependencyGraph, name: str) -> torch.Tensor:
    """The raw weight of conv/linear ``name`` as a detached float tensor, output channels first."""
    w = getattr(graph.module(name), "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"producer layer '{name}' has no weight tensor")
    return w.detach().float()


def int_option(options: dict[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = options.get(key, default)
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = None
    if out is None or (isinstance(value, float) and not value.is_integer()) or out < minimum:
        raise BadInput(f"option {key} must be an integer >= {minimum}, got {value!r}")
    return out


def float_option(options: dict[str, Any], key: str, default: float, *, minimum: float = 0.0) -> float:
    value = options.get(key, default)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"option {key} must be a number, got {value!r}") from None
    if not out >= minimum:
        raise BadInput(f"option {key} must be >= {minimum}, got {value!r}")
    return out


def choice_option(options: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = str(options.get(key, default))
    if value not in choices:
        raise BadInput(f"option {key}={value!r} is not valid: use one of {', '.join(choices)}")
    return value
