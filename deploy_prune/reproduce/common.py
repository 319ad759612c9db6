"""What every reproduction experiment shares: the run context, the models, and small statistics helpers.

Every experiment runs on the embedded digits (``mnist5k``: 4,000 training and 1,000 validation images, the
same split for every seed) with the product's own code: the criteria registry, the pruning stage
(:func:`deploy_prune.prune.prune_structured`), the channel surgery, the training loop and, for ``criteria``,
the latency target search. An experiment module exposes

* ``NAME``, ``TITLE`` and ``PAPER`` (the paper's setting and numbers, as the report prints them beside ours);
* ``run(ctx) -> dict``: the experiment's JSON entry (``settings``, ``rows``, ``summary``, ``finding``);
* ``plot(result, path)``: one PNG;
* ``markdown(result) -> list[str]``: its section of ``reproduce.md``.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from deploy_prune.data import DataBundle, load_data
from deploy_prune.spec import TrainSpec
from deploy_prune.train import Trainer

SHAPE = (1, 1, 28, 28)


@dataclass
class Context:
    """One ``reproduce`` run: the mode, the seeds, the data and where progress lines go.

    Attributes:
        quick: the short settings (each experiment has a ``QUICK`` and a ``FULL`` dict).
        seeds: the seeds that experiments averaging over seeds use (``0 .. N-1``).
        data: mnist5k, batch 64.
        say: prints one progress line.
        progress: show training progress bars.
    """

    quick: bool
    seeds: list[int]
    data: DataBundle
    say: Callable[[str], None] = lambda _: None
    progress: bool = False
    cache: dict[str, Any] = field(default_factory=dict)

    def seeds_for(self, name: str) -> list[int]:
        """The seeds experiment ``name`` averages over: all of them, except that a quick run keeps one seed for
        everything but the two experiments whose findings are stated over seeds (``criteria``, ``lottery``)."""
        return self.seeds if not self.quick or name in ("criteria", "lottery") else self.seeds[:1]

    def settings(self, quick: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
        return dict(quick if self.quick else full)

    def trainer(self, epochs: int, seed: int, lr: float | None = None) -> BNTrainer:
        """The product's finetuning recipe (:class:`TrainSpec`'s defaults: AdamW at 1e-3 unless ``lr``, cosine
        schedule after a 0.3-epoch warm-up, batch 64) for ``epochs`` epochs; it also
        logs every accuracy it measures with BatchNorm statistics re-estimated (:class:`BNTrainer`)."""
        return BNTrainer(self.data, TrainSpec(epochs=epochs, lr=lr, batch_size=64), seed, self.progress)


BN_BATCHES = 20


def reestimate_bn(model: nn.Module, loader: Any, batches: int = BN_BATCHES) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance in place from ``batches`` training batches (no
    gradient, weights untouched): after channels are removed, the next layer's pre-BN statistics change, and
    the stale running statistics alone can take a network to chance accuracy."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training = model.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                model(x)
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train(was_training)
    return model


class BNTrainer(Trainer):
    """The product's :class:`~deploy_prune.train.Trainer`, unchanged, that also records each measured accuracy
    with BatchNorm statistics re-estimated on a copy (``bn_log``, in call order); the model is not modified."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bn_log: list[float | None] = []

    def accuracy(self, model: nn.Module) -> float | None:
        acc = super().accuracy(model)
        if self.data is not None:
            self.bn_log.append(super().accuracy(reestimate_bn(copy.deepcopy(model), self.data.train)))
        return acc


def make_context(quick: bool, seeds: int, say: Callable[[str], None] = lambda _: None,
                 progress: bool = False) -> Context:
    return Context(quick, list(range(seeds)), load_data("mnist5k", batch_size=64, seed=0), say, progress)


def baseline_cnn(ctx: Context) -> nn.Module:
    """``builtin:mnist_cnn`` with its shipped weights (trained on this split): the one baseline checkpoint that
    the sensitivity, L1-mode, schedule and criteria experiments all start from (Blalock et al.: compare against
    the same baseline)."""
    from deploy_prune import models

    if "mnist_cnn" not in ctx.cache:
        entry = models.get("mnist_cnn")
        model = entry.build()
        state = models.shipped_state_dict(entry)
        assert state is not None, "mnist_cnn.pt is shipped with the package"
        model.load_state_dict(state)
        model.eval()
        ctx.cache["mnist_cnn"] = model
    return copy.deepcopy(ctx.cache["mnist_cnn"])


def builtin(name: str, seed: int) -> nn.Module:
    """A freshly initialised builtin model, its init drawn from ``seed``."""
    from deploy_prune import models

    torch.manual_seed(seed)
    return models.get(name).build()


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    vs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vs:
        return None, None
    return round(statistics.fmean(vs), 3), round(statistics.stdev(vs), 3) if len(vs) > 1 else 0.0


def pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    """``mean ± std`` for a table cell (``-`` when unknown)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out


def figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure without pyplot (no global backend state), and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    axes = fig.subplots(1, ncols)
    return fig, axes


def widths(model: nn.Module) -> list[int]:
    """Output widths of the conv/linear layers in registration order (``20-50-500-10``)."""
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
