"""Magnitude masks for the unstructured twin: exact non-zero budget, permanent zeros, no reparametrisation left."""

from __future__ import annotations

import torch
import torch.nn as nn

from deploy_prune.metrics import count_nonzero
from deploy_prune.unstructured import mask_to_nonzero, make_permanent


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_masks_hit_the_budget_exactly_and_drop_the_smallest_weights() -> None:
    model = _net()
    w0 = model[0].weight.detach().clone()
    target = count_nonzero(model) - 500
    mask_to_nonzero(model, target)
    make_permanent(model)
    assert count_nonzero(model) == target
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in model.named_parameters())
    # within a layer, every zeroed weight is no larger in magnitude than every kept one
    w = model[0].weight.detach()
    zeroed, kept = w0[w == 0].abs(), w0[w != 0].abs()
    assert zeroed.max() <= kept.min()


def test_existing_zeros_stay_zero_through_training_even_with_nothing_to_add() -> None:
    model = _net()
    with torch.no_grad():
        model[3].weight[:, :100] = 0.0  # a "ticket": weights already pruned
    before = count_nonzero(model)
    mask_to_nonzero(model, before)  # nothing more to remove, but the zeros must be held
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        opt.step()
    make_permanent(model)
    assert torch.all(model[3].weight[:, :100] == 0)
