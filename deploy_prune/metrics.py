"""Counting what a model costs: parameters, non-zero parameters and multiply-accumulates."""

from __future__ import annotations

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at ``input_shape``.

    Counts convolutions (out elements x in_channels/groups x kernel) and linear layers (out elements x
    in_features), with dense kernels: zeros in the weights are counted, because ONNX Runtime computes them.
    Norms, activations and pooling are left out, as in Li et al. and Torch-Pruning's counter.
    """
    total = 0

    def conv_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.modules.conv._ConvNd)
        k = 1
        for s in m.kernel_size:
            k *= s
        total += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(*input_shape))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total
