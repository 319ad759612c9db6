"""Training: the loop and evaluation (:mod:`.loop`), the finetuning recipe's parts (:mod:`.recipe`: optimizer
groups, warm-up + cosine schedule, distillation), BatchNorm re-estimation (:mod:`.bn`), and the schedules
pruning methods need (Network Slimming's sparsity training in :mod:`.sparsity`, the lottery-ticket rounds in
:mod:`.lottery`).

:class:`Trainer` is what the pipeline hands to the pruning stage: the run's finetuning recipe, BatchNorm
re-estimation and evaluation, bound to its data and to the dense model it distils from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from deploy_prune.spec import TrainSpec
from deploy_prune.train.bn import calibration_loader, recalibrate_bn
from deploy_prune.train.headfit import refit_heads
from deploy_prune.train.loop import evaluate, finetune, train
from deploy_prune.train.recipe import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, Recipe, distillation_loss, \
    lr_factor, make_optimizer

__all__ = ["Trainer", "evaluate", "finetune", "recalibrate_bn", "train"]


@dataclass
class Trainer:
    """The run's finetuning recipe and evaluation, bound to its data (None: both do nothing).

    Attributes:
        data: a :class:`~deploy_prune.data.DataBundle` or None.
        spec: epochs, learning rate, batch size.
        seed: seeds every finetuning run and the order of the BatchNorm re-estimation batches.
        progress: show progress bars.
        teacher: the dense model distilled from (``spec.distill``); None = plain cross-entropy.
    """

    data: Any
    spec: TrainSpec
    seed: int = 0
    progress: bool = True
    teacher: nn.Module | None = None
    recalibrated: list[dict[str, Any]] = field(default_factory=list)  # one row per re-estimation done

    @property
    def epochs(self) -> int:
        """Finetuning epochs that will really run (0 without data)."""
        return self.spec.epochs if self.data is not None else 0

    def accuracy(self, model: nn.Module) -> float | None:
        """Top-1 % on the validation split, rounded to 0.01; None without data."""
        if self.data is None:
            return None
        return round(float(evaluate(model, self.data.val)), 2)

    def recipe(self) -> Recipe:
        """The finetuning settings, with the optimizer's default LR and weight decay filled in."""
        s = self.spec
        return Recipe(optimizer=s.optimizer, lr=s.lr if s.lr is not None else DEFAULT_LR[s.optimizer],
                      weight_decay=s.weight_decay if s.weight_decay is not None else DEFAULT_WEIGHT_DECAY[s.optimizer],
                      schedule=s.lr_schedule, warmup_epochs=s.warmup_epochs, distill=self.distilling,
                      temperature=s.distill_temperature, alpha=s.distill_alpha)

    @property
    def distilling(self) -> bool:
        return self.spec.distill and self.teacher is not None and self.data is not None

    def recalibrate(self, model: nn.Module, what: str) -> dict[str, Any] | None:
        """Repair what surgery left stale, on ``spec.bn_recalib_batches`` training batches, before ``model`` is
        evaluated or finetuned: re-estimate every BatchNorm's statistics
        (:func:`deploy_prune.train.bn.recalibrate_bn`), then, with ``spec.head_refit``, refit the classifier
        (the Linear producing the output, and any Linear whose inputs were narrowed) to the dense model's outputs
        (:func:`deploy_prune.train.headfit.refit_heads`).
        Nothing without data or with 0 batches."""
        if self.data is None or self.spec.bn_recalib_batches <= 0:
            return None
        with torch.random.fork_rng(devices=[]):
            done, heads = self._repair(model)
        if done is None and not heads:
            return None
        row: dict[str, Any] = {"after": what, **(done or {"batches": 0, "images": 0, "layers": 0})}
        if heads:
            row["head_refit"] = heads
        self.recalibrated.append(row)
        return row

    def _repair(self, model: nn.Module) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """BatchNorm re-estimation, then the classifier refit (the caller forks the RNG)."""
        n = self.spec.bn_recalib_batches
        # A training transform with random crops draws from torch's global RNG when read outside the training
        # sampler: seed it for each pass, so that both passes see the same images whatever ran before (a resumed
        # run, other runs in the same process), and leave the global RNG as it was.
        torch.manual_seed(self.seed)
        done = recalibrate_bn(model, self.data.train, n, seed=self.seed)
        heads: list[dict[str, Any]] = []
        if self.spec.head_refit and self.teacher is not None:
            torch.manual_seed(self.seed)
            batches = self._ordered(self.seed)
            heads = refit_heads(model, self.teacher, batches, n)
        return done, heads

    def _ordered(self, seed: int) -> Any:
        loader = self.data.train
        return calibration_loader(loader, seed) if isinstance(loader, DataLoader) else loader

    def score(self, model: nn.Module, batches: int = 20) -> float | None:
        """How good a candidate pruned ``model`` is before any finetuning, the way EagleEye (Li et al. 2020)
        compares candidates: BatchNorm re-estimated (and the classifier refit) exactly as :meth:`recalibrate`
        does, then top-1 % on ``batches`` training batches drawn in a second seeded order. The validation
        split is never looked at, so choosing by this score does not tune on the reported accuracy. ``model``
        is changed (statistics, heads); None without data or with re-estimation off."""
        if self.data is None or self.spec.bn_recalib_batches <= 0:
            return None
        with torch.random.fork_rng(devices=[]):
            self._repair(model)
            torch.manual_seed(self.seed + 1)
            return float(evaluate(model, self._ordered(self.seed + 1), max_batches=batches))

    def finetune(self, model: nn.Module, desc: str, *, epochs: int | None = None,
                 after_step: Callable[[nn.Module], None] | None = None) -> None:
        """Finetune ``model`` in place with the run's recipe (:meth:`recipe`); nothing without data or epochs."""
        epochs = self.spec.epochs if epochs is None else epochs
        if self.data is None or epochs <= 0:
            return
        r = self.recipe()
        warmup = r.warmup_steps(len(self.data.train), epochs * len(self.data.train))
        loss_fn = None
        if r.distill:
            teacher = self.teacher
            assert teacher is not None
            teacher.eval()

            def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    target = teacher(x)
                return distillation_loss(logits, target, y, temperature=r.temperature, alpha=r.alpha)

        train(model, self.data.train, epochs=epochs, lr=r.lr,
              optimizer=lambda m: make_optimizer(m, r.optimizer, r.lr, r.weight_decay),
              lr_schedule=lambda step, total: lr_factor(step, total, warmup, r.schedule), loss_fn=loss_fn,
              after_step=after_step, seed=self.seed, desc=desc, progress=self.progress)

    def report(self) -> dict[str, Any]:
        """The report's ``finetune`` and ``bn_recalibration`` entries: what was done, or why it was skipped."""
        s = self.spec
        ft: dict[str, Any] = {"epochs": s.epochs if self.data is not None else 0}
        if self.data is None:
            ft["skipped"] = "no --data"
        elif s.epochs <= 0:
            ft["skipped"] = "--epochs 0 / --no-finetune"
        else:
            ft.update(self.recipe().report())
        if self.distilling and s.epochs > 0:
            ft["distillation"] = {"teacher": "dense", "temperature": s.distill_temperature, "alpha": s.distill_alpha,
                                  "loss": "alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE"}
        else:
            why = ("no --data" if self.data is None else "--no-distill" if not s.distill else
                   "no finetuning" if s.epochs <= 0 else "no dense model to distil from")
            ft["distillation"] = {"skipped": why}
        bn: dict[str, Any] = {"batches": s.bn_recalib_batches}
        if self.recalibrated:
            bn["done"] = list(self.recalibrated)
        else:
            bn["skipped"] = ("no --data" if self.data is None else "--bn-recalib-batches 0"
                             if s.bn_recalib_batches <= 0 else "no BatchNorm layers")
        return {"finetune": ft, "bn_recalibration": bn}
