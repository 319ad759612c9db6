"""A plain supervised training loop with two hooks, and top-1 evaluation.

The hooks are where the pruning methods plug in:

* ``after_backward(model)`` runs between ``loss.backward()`` and ``optimizer.step()``: Network Slimming adds
  its L1 subgradient ``lambda * sign(gamma)`` to the BN weight gradients there, as its official code does.
* ``after_step(model)`` runs after every ``optimizer.step()``: the lottery-ticket search re-applies its masks
  there, so pruned weights are exactly zero again before the next forward pass.

Under torchrun (:mod:`deploy_prune.distributed`) the loop trains through ``DistributedDataParallel`` on this
rank's shard of the data, and evaluation sums its counts over the ranks; inside a pipeline run every epoch
is checkpointed (:mod:`deploy_prune.resume`) and an interrupted training run continues from its last epoch.

Runs are deterministic on CPU: ``train`` seeds torch's global generator (dropout) and, when the loader has
one, the loader's shuffling generator, so two calls with the same seed see the same batches in the same
order.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from deploy_prune import distributed, resume
from deploy_prune.errors import BadInput, opt

Hook = Callable[[nn.Module], None]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, inputs, labels) -> loss


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(model: nn.Module, loader: DataLoader, *, max_batches: int | None = None) -> float:
    """Top-1 accuracy in percent, in eval mode without gradients (the model's mode is restored after).

    Args:
        model: a classifier returning logits ``(N, classes)``.
        loader: yields ``(inputs, labels)``.
        max_batches: evaluate only the first this many batches (None = all).
    """
    was_training = model.training
    device = _device(model)
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            # data-parallel: each rank evaluates its share of the batches and the counts are summed
            for x, y in distributed.shard_eval(loader, max_batches):
                pred = model(x.to(device)).argmax(dim=1)
                correct += int((pred == y.to(device)).sum())
                total += int(y.numel())
    finally:
        model.train(was_training)
    correct, total = distributed.sum_numbers(correct, total)
    if total == 0:
        raise BadInput(f"the evaluation data is empty: give {opt('data')} a non-empty validation split")
    return 100.0 * correct / total


def _optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
               ) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise BadInput(f"unknown optimizer {name!r}: use sgd or adam")


def train(model: nn.Module, loader: DataLoader, *, epochs: int, lr: float,
          optimizer: str | Callable[[nn.Module], torch.optim.Optimizer] = "sgd",
          momentum: float = 0.9, weight_decay: float = 0.0, after_backward: Hook | None = None,
          after_step: Hook | None = None, seed: int | None = 0, desc: str = "finetune",
          progress: bool = True, lr_schedule: Callable[[int, int], float] | None = None,
          loss_fn: LossFn | None = None) -> list[float]:
    """Train ``model`` in place with cross-entropy; return the mean training loss of each epoch.

    Args:
        model: the classifier (left in train mode when done).
        loader: yields ``(inputs, labels)``.
        epochs: number of passes over ``loader`` (0 = nothing happens).
        lr: constant learning rate (the pruning papers' finetuning schedules are constant or step decays;
            a constant rate is what Li et al. use to retrain).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``, or a function that builds the optimizer for
            ``model`` (its groups' ``lr`` are the base rates; ``lr`` is then unused).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty passed to the optimizer.
        after_backward: called with the model after each ``backward()``, before the step.
        after_step: called with the model after each optimizer step.
        seed: seeds torch's global generator and the loader's shuffling generator (None = leave them).
        desc: label of the progress bar.
        progress: show a tqdm bar with the running loss on stderr.
        lr_schedule: ``f(step, total_steps)`` -> multiplier of each group's base LR for that optimizer step
            (0-based; see :func:`deploy_prune.train.recipe.lr_factor`); None = constant.
        loss_fn: ``f(logits, inputs, labels)`` -> loss (e.g. distillation); None = cross-entropy.

    Raises:
        BadInput: unknown optimizer, negative epochs, or a loss that became NaN/inf (lower the LR).
    """
    if epochs < 0:
        raise BadInput(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return []
    # lazy: only training needs it. Plain tqdm, not tqdm.auto: tqdm.auto's asyncio wrapper calls iter() on
    # the loader when the bar is built, which draws from the shuffling generator and shifts the data order.
    from tqdm import tqdm

    from deploy_prune.progress import tqdm_options

    if seed is not None:
        torch.manual_seed(seed)
        gen = getattr(loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed)
    gen = getattr(loader, "generator", None)
    # data-parallel (torchrun): this rank's shard of the data, the optimizer on the plain (pruned) module, then
    # the DDP wrap; without torchrun these are the loader and the model themselves
    loader, sampler = distributed.shard_train(loader, 0 if seed is None else seed)
    device = distributed.device() or _device(model)
    opt = optimizer(model) if callable(optimizer) else _optimizer(model, optimizer, lr, momentum, weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a checkpoint overwrites them with scheduled values
    total_steps = epochs * len(loader)
    checkpoint = resume.current()  # the run's per-epoch checkpoints (None outside a pipeline run)
    model.train()
    losses: list[float] = []
    with distributed.data_parallel(model) as net:
        start = 0
        if checkpoint is not None:
            start, losses = checkpoint.begin(model, opt, desc=desc, epochs=epochs, generator=gen, hook=after_step)
        done = start * len(loader)
        for epoch in range(start, epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            total, count = 0.0, 0
            bar: Any = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", **tqdm_options(progress))
            for step, (x, y) in enumerate(bar):
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                if lr_schedule is not None:
                    factor = lr_schedule(done, total_steps)
                    for g, base in zip(opt.param_groups, base_lrs):
                        g["lr"] = base * factor
                logits = net(x)
                loss = F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, x, y)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise BadInput(f"{desc}: the training loss became {value} at epoch {epoch + 1}, step {step + 1}: "
                                   f"lower the learning rate (now {lr})")
                loss.backward()
                if after_backward is not None:
                    after_backward(model)
                opt.step()
                if after_step is not None:
                    after_step(model)
                done += 1
                total += value * y.shape[0]
                count += y.shape[0]
                bar.set_postfix(loss=f"{total / count:.4f}")
            bar.close()
            total, count = distributed.sum_numbers(total, count)  # every rank reports the global mean
            losses.append(total / max(count, 1))
            if checkpoint is not None:
                checkpoint.end_epoch(model, opt, epoch=epoch, losses=losses, generator=gen, hook=after_step)
    return losses


def finetune(model: nn.Module, data: Any, epochs: int, lr: float = 1e-3, *, optimizer: str = "sgd",
             momentum: float = 0.9, weight_decay: float = 1e-4, seed: int | None = 0,
             progress: bool = True) -> list[float]:
    """Finetune on ``data.train`` (a :class:`~deploy_prune.data.DataBundle`).

    The default LR 1e-3 (constant, SGD momentum 0.9, weight decay 1e-4) is Li et al.'s retraining rate
    (they retrain 40 epochs on CIFAR, 20 on ImageNet; RNP's ``main_finetune.py`` uses the same LR).
    """
    return train(model, data.train, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                 weight_decay=weight_decay, seed=seed, desc="finetune", progress=progress)
