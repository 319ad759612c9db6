"""BatchNorm re-estimation after surgery ("adaptive BN", Li et al., EagleEye, ECCV 2020).

Removing channels changes what every later layer sees, so the BatchNorm running means and variances a pruned
model inherits describe activations that no longer exist; evaluated with them, a pruned BN network often
predicts one class for every input (``mnist_cnn`` at ratio 0.5: 11.8% on ten classes). Re-estimating the
statistics on a few training batches, with no gradient step, restores most of the accuracy the pruned weights
really have, and makes "accuracy right after pruning" a number that means something.

:func:`recalibrate_bn` does what ``torch.optim.swa_utils.update_bn`` and ModelOpt's ``_reset_bn`` do:
``reset_running_stats()`` and ``momentum=None`` on every BatchNorm (a cumulative average over the batches,
not an exponential one), forward passes without gradients, then the momentum and the model's mode are put back.

Departures, both deliberate:

* EagleEye keeps the default momentum (0.1) and does not reset the statistics; with a few dozen batches the
  exponential average still carries the stale values (0.9^20 = 12% of them after 20 batches). The cumulative
  average of the reset statistics is exact for the batches seen (ModelOpt, ``update_bn``).
* Only the BatchNorm layers are put in train mode; everything else stays in eval mode, so dropout is off and
  the statistics describe the activations the model sees at inference. For a network without dropout before
  a BatchNorm (every CNN in torchvision) this is identical to ``model.train()``.
* The batches are drawn from the training set in an order of their own (a generator seeded with ``seed``), so
  re-estimation neither depends on nor moves the finetuning loader's shuffling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

DEFAULT_BATCHES = 50


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, subclasses) that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def calibration_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A loader over ``loader``'s dataset and batch size, shuffled by its own generator seeded with ``seed``."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=0)


def recalibrate_bn(model: nn.Module, loader: Any, num_batches: int, *, seed: int = 0) -> dict[str, Any] | None:
    """Re-estimate the running statistics of every BatchNorm in ``model`` on ``num_batches`` training batches.

    Args:
        model: changed in place (running means, variances and batch counters only; no parameter moves).
        loader: a training :class:`~torch.utils.data.DataLoader` yielding ``(inputs, labels)``; its dataset is
            read in an order seeded by ``seed`` (see the module docstring), or, for any other iterable, in
            its own order.
        num_batches: batches to average over (fewer if the data has fewer); 0 does nothing.
        seed: seeds the order the batches are drawn in.

    Returns:
        ``{"batches", "images", "layers"}`` as done, or None when nothing was done (0 batches, no BatchNorm).
    """
    bns = batchnorms(model)
    if num_batches <= 0 or not bns:
        return None
    source = calibration_loader(loader, seed) if isinstance(loader, DataLoader) else loader
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    device = _device(model)
    batches = images = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the batches seen
            bn.train()
        with torch.no_grad():
            for x, *_ in source:
                if batches >= num_batches:
                    break
                model(x.to(device))
                batches += 1
                images += int(x.shape[0])
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, was in modes.items():
            m.training = was
    return {"batches": batches, "images": images, "layers": len(bns)}
