"""Training: the loop and evaluation (:mod:`.loop`), and the schedules pruning methods need (Network Slimming's
sparsity training in :mod:`.sparsity`, the lottery-ticket rounds in :mod:`.lottery`).

:class:`Trainer` is what the pipeline hands to the pruning stage: the run's finetuning recipe and evaluation,
bound to its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from deploy_prune.spec import TrainSpec
from deploy_prune.train.loop import evaluate, finetune, train

__all__ = ["Trainer", "evaluate", "finetune", "train"]

DEFAULT_LR = 1e-3


@dataclass
class Trainer:
    """The run's finetuning recipe and evaluation, bound to its data (None: both do nothing).

    Attributes:
        data: a :class:`~deploy_prune.data.DataBundle` or None.
        spec: epochs, learning rate, batch size.
        seed: seeds every finetuning run.
        progress: show progress bars.
    """

    data: Any
    spec: TrainSpec
    seed: int = 0
    progress: bool = True

    @property
    def epochs(self) -> int:
        """Finetuning epochs that will really run (0 without data)."""
        return self.spec.epochs if self.data is not None else 0

    def accuracy(self, model: nn.Module) -> float | None:
        """Top-1 % on the validation split, rounded to 0.01; None without data."""
        if self.data is None:
            return None
        return round(float(evaluate(model, self.data.val)), 2)

    def finetune(self, model: nn.Module, desc: str, *, epochs: int | None = None,
                 after_step: Callable[[nn.Module], None] | None = None) -> None:
        """Finetune ``model`` in place (Adam, constant learning rate); nothing without data or epochs."""
        epochs = self.spec.epochs if epochs is None else epochs
        if self.data is None or epochs <= 0:
            return
        lr = self.spec.lr if self.spec.lr is not None else DEFAULT_LR
        train(model, self.data.train, epochs=epochs, lr=lr, optimizer="adam", weight_decay=0.0,
              after_step=after_step, seed=self.seed, desc=desc, progress=self.progress)
