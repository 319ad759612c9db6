"""Network Slimming's sparsity training (Liu et al. 2017): train with an L1 penalty on every BatchNorm scale.

The official code adds the penalty's subgradient after ``backward()``: ``bn.weight.grad += lambda *
sign(bn.weight)`` (``main.py`` ``updateBN``); :func:`sparsity_training` does exactly that through the training
loop's ``after_backward`` hook.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from deploy_prune.train.loop import train

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_weights(model: nn.Module) -> list[nn.Parameter]:
    """The affine scale ``gamma`` of every BatchNorm in ``model``."""
    return [m.weight for m in model.modules()
            if isinstance(m, BATCHNORMS) and isinstance(getattr(m, "weight", None), nn.Parameter)]


def sparsity_training(model: nn.Module, loader: Any, *, sparsity: float, epochs: int, lr: float,
                      seed: int = 0, progress: bool = True) -> list[float]:
    """Train ``model`` in place with Liu et al.'s L1 penalty on every BN gamma; return per-epoch losses."""
    gammas = batchnorm_weights(model)

    def add_l1_subgradient(_: nn.Module) -> None:
        # official main.py updateBN(): bn.weight.grad.data.add_(s * torch.sign(bn.weight.data))
        with torch.no_grad():
            for w in gammas:
                if w.grad is not None:
                    w.grad.add_(torch.sign(w), alpha=sparsity)

    was_training = model.training
    try:
        return train(model, loader, epochs=epochs, lr=lr, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
                     after_backward=add_l1_subgradient, seed=seed, desc="sparsity", progress=progress)
    finally:
        model.train(was_training)
