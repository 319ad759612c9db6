"""``slimming``: BatchNorm scaling factors (Liu et al., "Network Slimming", ICCV 2017).

**Equation.** Training minimises ``L = sum_(x,y) l(f(x, W), y) + lambda * sum_{gamma in Gamma} |gamma|``
(Eq. 1, g(s) = |s|) over every BN scale ``gamma``; a channel's score is ``|gamma|`` of the BatchNorm that
scales it, and channels are ranked against **one global threshold** over all layers (scope ``"global"``: the
planner concatenates all scores and removes the lowest ``ratio``; a layer never drops below
``1 - max_layer_ratio`` of its width, which guards against the paper's "a global threshold can empty a
layer" failure). By default no layer loses more than half its channels in one step
(``slimming_max_layer_ratio`` 0.5, the paper's multi-pass limit "at most 50% of any layer"); the planner
then passes over a capped layer's channels and takes the next-lowest gammas elsewhere, so the global quota is
still met. Without the cap, the gammas of a model that was not sparsity-trained from scratch decide by layer
scale rather than channel importance: on ``mnist_cnn`` every gamma of the last layer exceeds every gamma of
the other four, and the threshold cut those four to 8 channels (91.9% vs 97.1% dense with the weights
shipped before 2026-12-04; with the converged ones the uncapped widths are the same; docs/criteria.md).

* Several BatchNorms on one channel (a residual stage: every block's last BN and the shortcut's BN scale the
  same channel): the score is the **max** of their ``|gamma|``, so a channel is pruned only when every path
  through it is weak.
* A channel with no BatchNorm (or only LayerNorm/GroupNorm/affine-less BN) has no scaling factor to read: its
  score is ``+inf``, meaning "no evidence": it must be neither pruned nor counted in the global pool (the
  planner's contract for non-finite scores), so ``ratio`` is a fraction of the BN-scaled channels, as in
  Liu et al.'s code, which concatenates BN weights only.

**Sparsity training** (``prepare``, only when ``ctx.data`` is given and ``sparsity_epochs > 0``): the model is
trained in place with the official code's subgradient step, ``bn.weight.grad += lambda * sign(bn.weight)``
after every ``backward()`` (``main.py`` ``updateBN``), for every BatchNorm with an affine weight. Without data
the trained gammas are used as they are.

**Options** (:class:`SlimmingOptions`):

* ``sparsity`` (lambda, default 1e-4, the paper's VGG value; 1e-5 for ResNet/DenseNet).
* ``sparsity_epochs`` (default 2; 0 disables the sparsity training).
* ``sparsity_lr`` (default 0.01), with SGD momentum 0.9 and weight decay 1e-4 (the paper's optimizer and
  decay; constant LR).

**Artifacts.** ``ctx.report["gamma_hist"] = {"before": counts, "after": counts | None, "bins": edges,
"lambda": ..., "epochs": ...}``: histograms of |gamma| over all BatchNorms with a common set of bin edges
(the seed report's Figure 4); :func:`plot_gamma_hist` draws it.

**Departures from the paper.** Liu et al. train *from scratch* with the penalty for 160 epochs at LR 0.1
(divided by 10 at 50% and 75%), initialising gamma to 0.5. Here the penalty is applied while finetuning an
already-trained model for a few epochs at a constant LR, so gammas move by at most about
``lambda * lr * steps / (1 - momentum)`` from the penalty: with the defaults and a few hundred steps the
histogram barely changes; raise ``sparsity`` (e.g. 1e-3...1e-2) or ``sparsity_epochs`` for a visible Figure-4
shift. The planner removes the ``int(total * ratio)`` lowest channels (``<= thr``, ``thr`` the k-th smallest);
the official ``vggprune.py`` keeps ``gamma > sorted[int(total * percent)]``, i.e. removes one channel more.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from deploy_prune.criteria._util import BATCHNORMS
from deploy_prune.criteria.base import BaseCriterion, CriterionOptions, ScoreContext, option, register
from deploy_prune.surgery.graph import Channel, DependencyGraph, Group
from deploy_prune.train.sparsity import batchnorm_weights, sparsity_training

HIST_BINS = 40


def _all_gammas(model: nn.Module) -> torch.Tensor:
    ws = batchnorm_weights(model)
    return torch.cat([w.detach().abs().reshape(-1).float() for w in ws]) if ws else torch.zeros(0)


def _histogram(values: torch.Tensor, edges: torch.Tensor) -> list[int]:
    if values.numel() == 0:
        return [0] * (len(edges) - 1)
    # bucketize into [e_k, e_{k+1}); the top edge is inclusive like numpy.histogram
    idx = torch.bucketize(values, edges, right=True) - 1
    idx = idx.clamp(0, len(edges) - 2)
    return torch.bincount(idx, minlength=len(edges) - 1).tolist()


def gamma_histogram(before: torch.Tensor, after: torch.Tensor | None, bins: int = HIST_BINS
                    ) -> dict[str, Any]:
    """Histograms of |gamma| before/after sparsity training, sharing one set of bin edges from 0."""
    top = float(before.max()) if before.numel() else 1.0
    if after is not None and after.numel():
        top = max(top, float(after.max()))
    edges = torch.linspace(0.0, top if top > 0 else 1.0, bins + 1, dtype=torch.float64)
    return {"before": _histogram(before.double(), edges),
            "after": _histogram(after.double(), edges) if after is not None else None,
            "bins": [float(e) for e in edges]}


@dataclass(frozen=True)
class SlimmingOptions(CriterionOptions):
    sparsity: float = option(1e-4, "slimming: lambda of the L1 penalty on BN scales.", minimum=0.0)
    sparsity_epochs: int = option(2, "slimming: sparsity-training epochs (needs --data).", minimum=0, integer=True)
    sparsity_lr: float = option(0.01, "slimming: learning rate of the sparsity training (SGD, momentum 0.9).",
                                minimum=0.0)
    slimming_max_layer_ratio: float = option(
        0.5, "slimming: never remove more than this fraction of one layer in one step (Liu et al.'s multi-pass "
        "limit); the global threshold's quota then goes to other layers. 1 = only --max-layer-ratio.",
        minimum=0.0)


@register
class SlimmingCriterion(BaseCriterion):
    """|gamma| of the channel's BatchNorm(s), one global threshold; see the module docstring."""

    name: ClassVar[str] = "slimming"
    summary: ClassVar[str] = "BatchNorm scaling factors after L1 sparsity training (Liu et al. 2017)"
    scope: ClassVar[str] = "global"
    Options = SlimmingOptions
    options: SlimmingOptions
    step_layer_cap_option: ClassVar[str] = "slimming_max_layer_ratio"

    @property
    def step_layer_cap(self) -> float:
        """The planner's per-step, per-layer limit for this criterion (``slimming_max_layer_ratio``)."""
        return self.options.slimming_max_layer_ratio

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None:
        o = self.options
        before = _all_gammas(model)
        after = None
        trained = ctx.data is not None and o.sparsity_epochs > 0 and bool(batchnorm_weights(model))
        if trained:
            sparsity_training(model, ctx.data.train, sparsity=o.sparsity, epochs=o.sparsity_epochs,
                              lr=o.sparsity_lr, seed=ctx.seed, progress=ctx.progress)
            after = _all_gammas(model)
        hist = {**gamma_histogram(before, after), "lambda": o.sparsity, "epochs": o.sparsity_epochs if trained else 0}
        ctx.report["gamma_hist"] = hist
        ctx.plots["gamma_hist.png"] = functools.partial(plot_gamma_hist, hist)

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        return torch.tensor([channel_gamma(graph, ch) for ch in group.channels])


def channel_gamma(graph: DependencyGraph, channel: Channel) -> float:
    """max |gamma| over the BatchNorms scaling ``channel``; ``+inf`` when none does ("no evidence")."""
    gammas = []
    for name, i in channel.norms:
        m = graph.module(name)
        w = getattr(m, "weight", None)
        if isinstance(m, BATCHNORMS) and isinstance(w, torch.Tensor):
            gammas.append(abs(float(w.detach()[i])))
    return max(gammas) if gammas else float("inf")


def plot_gamma_hist(artifact: dict[str, Any], path: str | Path) -> Path:
    """Draw ``ctx.artifacts["gamma_hist"]`` as a PNG (step histograms of |gamma| before/after); return the path."""
    from matplotlib.figure import Figure  # lazy, and no pyplot: no global backend or figure state

    edges = artifact["bins"]
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    ax.stairs(artifact["before"], edges, label="before sparsity training", linewidth=1.5)
    if artifact.get("after") is not None:
        ax.stairs(artifact["after"], edges,
                  label=f"after ({artifact.get('epochs', '?')} epochs, lambda={artifact.get('lambda')})",
                  linewidth=1.5)
    ax.set_xlabel("|gamma| (BatchNorm scaling factor)")
    ax.set_ylabel("channels")
    ax.set_title("Network Slimming: distribution of scaling factors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
