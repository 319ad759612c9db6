"""The unstructured counterpart: magnitude masks with the same number of non-zero weights.

The structured model and its unstructured twin are compared at an equal parameter budget (contract:
``nonzero_params`` within 1%). Every conv/linear weight tensor loses the same fraction of its smallest-
magnitude entries (layer-wise L1, as ``torch.nn.utils.prune.l1_unstructured``), with the fraction solved so
the total non-zero count matches the target. Masks are made permanent with ``prune.remove`` before export,
so the ONNX graph holds plain weights with zeros, never ``weight_orig``/``weight_mask`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import prune

from deploy_prune.errors import BadInput, opt
from deploy_prune.metrics import count_nonzero


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv (any dimension, transposed too) and linear layer with a weight, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LAYERS) and isinstance(m.weight, nn.Parameter)}


def mask_to_nonzero(model: nn.Module, target_nonzero: int) -> dict[str, torch.Tensor]:
    """Mask ``model`` in place (reparametrised, masks live) so it holds ``target_nonzero`` non-zeros.

    Returns the masks by layer name. Call :func:`make_permanent` before export.
    """
    layers = list(weight_layers(model).items())
    nz_now = count_nonzero(model)
    # Even with nothing left to zero, weights that are already zero (a lottery ticket) get a live mask, so
    # finetuning cannot revive them.
    to_zero = max(0, nz_now - target_nonzero)
    live = [int(torch.count_nonzero(m.weight.detach())) for _, m in layers]
    budget = sum(live)
    if to_zero > budget:
        raise BadInput("the structured model is smaller than any unstructured mask of this model can reach; "
                       f"lower {opt('ratio')}")
    frac = to_zero / budget if budget else 0.0
    amounts = [int(round(frac * n)) for n in live]
    # put the rounding remainder on the largest layer so the total is exact
    diff = to_zero - sum(amounts)
    big = max(range(len(layers)), key=lambda i: live[i])
    amounts[big] = min(live[big], max(0, amounts[big] + diff))
    masks = {}
    for (name, m), amount, n_live in zip(layers, amounts, live):
        dead = m.weight.numel() - n_live  # already-zero entries count as pruned first (smallest |w|)
        prune.l1_unstructured(m, "weight", amount=min(m.weight.numel(), amount + dead))
        masks[name] = m.weight_mask.detach().clone()
    return masks


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every live pruning mask into its weight (``prune.remove``)."""
    for m in model.modules():  # a masked weight is no Parameter any more: weight_layers() would skip it
        if isinstance(m, _LAYERS) and prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")
    return model


def unstructured_like(model: nn.Module, target_nonzero: int) -> nn.Module:
    """Mask ``model`` in place to ``target_nonzero`` non-zeros and make it permanent."""
    mask_to_nonzero(model, target_nonzero)
    return make_permanent(model)
