"""Per-layer pruning sensitivity (Li et al. 2017, §4 and Fig. 2b).

Each prunable group (a layer, or the coupled layers of a residual stage) is pruned **alone**, at increasing
fractions, with no retraining, and the validation accuracy is measured. Layers whose accuracy collapses
early are sensitive and should be pruned less or skipped; :func:`ratios_from_sensitivity` turns the sweep
into per-layer ratios for ``PlanConfig.layer_ratios``.

How a trial is made: the model is copied once, analysed once, and the criterion is prepared once on that
copy (so the caller's model is never modified, even by slimming's sparsity training); each (group, fraction)
then prunes a fresh copy of it with :func:`~deploy_prune.surgery.plan.select` restricted to that group
(``layer_ratios = {module: fraction}``, ``max_layer_ratio = 1``) and
:func:`~deploy_prune.surgery.apply.prune_channels`. Kept counts truncate like Li et al.'s code
(``int(n * (1 - f))``, at least one channel).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from deploy_prune import criteria
from deploy_prune.errors import BadInput
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select
from deploy_prune.train import evaluate

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def group_label(modules: tuple[str, ...] | list[str]) -> str:
    """A readable name for a group: its first producer layer, plus how many layers are coupled to it."""
    return modules[0] if len(modules) == 1 else f"{modules[0]} (+{len(modules) - 1} coupled)"


def _check_logits(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Accuracy here is a classifier's top-1: refuse a model with dense or several outputs in one line."""
    import torch

    from deploy_prune.outputs import LOGITS, named_outputs

    with torch.no_grad():
        try:
            out = model.eval()(torch.zeros(*input_shape))
        except Exception:  # noqa: BLE001 - a shape problem is reported by the analysis with its own message
            return
    names = [n for n, _ in named_outputs(out)]
    if names != [LOGITS]:
        raise BadInput(f"the sensitivity sweep measures a classifier's top-1 accuracy, but the model returns "
                       f"{', '.join(names)} rather than one logits tensor; prune it with run (no data) instead")


def sensitivity(model: nn.Module, data: Any, input_shape: tuple[int, ...], *, criterion: Any = "l1",
                fractions: tuple[float, ...] = DEFAULT_FRACTIONS, max_batches: int | None = None,
                seed: int = 0, options: Any = None, progress: bool = True,
                after_prune: Callable[[nn.Module], Any] | None = None) -> dict[str, Any]:
    """Prune every group alone at each fraction, without retraining, and measure validation accuracy.

    Args:
        model: the trained network (not modified).
        data: a :class:`~deploy_prune.data.DataBundle`; ``data.val`` is evaluated.
        input_shape: ``(1, C, H, W)`` for the dependency analysis.
        criterion: a registered criterion name (``l1``, ``fpgm``, ``apoz``, ``random``, ``slimming``...), or a
            criterion instance (``deploy-prune reproduce`` sweeps an unregistered largest-L1 ranking).
        options: the criterion's options (its ``Options``; None = defaults).
        fractions: pruned fractions to try, each in (0, 1).
        max_batches: evaluate only this many validation batches per trial (None = all).
        seed: the run seed (random criterion, any training a criterion's ``prepare`` does).
        after_prune: called on each pruned trial before it is evaluated (e.g. to re-estimate BatchNorm
            statistics); None = evaluate it as pruned.

    Returns:
        ``{"criterion", "baseline": acc, "layers": {label: {"modules": [...], "size": n, "fractions": [...],
        "removed": [channels removed per fraction], "accuracy": [...]}}}``, labels in graph order.
    """
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise BadInput(f"sensitivity fractions must lie in (0, 1), got {list(fractions)}")
    work = copy.deepcopy(model)
    _check_logits(work, input_shape)
    graph = analyze(work, input_shape)
    crit = criteria.create(criterion, options) if isinstance(criterion, str) else criterion
    ctx = criteria.ScoreContext(data=data, seed=seed, progress=progress)
    crit.prepare(work, graph, ctx)
    baseline = evaluate(work, data.val, max_batches=max_batches)
    layers: dict[str, Any] = {}
    for group in graph.groups:
        entry: dict[str, Any] = {"modules": list(group.modules), "size": group.size, "fractions": [],
                                 "removed": [], "accuracy": []}
        for f in fractions:
            cfg = PlanConfig(ratio=0.0, max_layer_ratio=1.0, layer_ratios={m: f for m in group.modules})
            plan = select(graph, crit, cfg)
            trial = copy.deepcopy(work)
            prune_channels(trial, graph, plan)
            if after_prune is not None:
                after_prune(trial)
            entry["fractions"].append(float(f))
            entry["removed"].append(_classes_removed(graph, group, plan))
            entry["accuracy"].append(evaluate(trial, data.val, max_batches=max_batches))
        layers[group_label(group.modules)] = entry
    return {"criterion": getattr(crit, "name", str(criterion)), "baseline": baseline, "layers": layers}


def ratios_from_sensitivity(result: dict[str, Any], max_drop: float = 1.0) -> dict[str, float]:
    """Per-module pruning ratio: the largest fraction up to which accuracy stays within ``max_drop`` points.

    The rule takes the longest run of fractions, from the smallest, whose accuracy is all
    ``>= baseline - max_drop`` (a lucky recovery at a larger fraction after a failing one does not count);
    a group that fails at its smallest fraction gets 0.0 (not pruned). Every module of a group gets the
    group's ratio.
    """
    floor = result["baseline"] - max_drop
    ratios: dict[str, float] = {}
    for entry in result["layers"].values():
        ratio = 0.0
        for f, acc in sorted(zip(entry["fractions"], entry["accuracy"])):
            if acc < floor:
                break
            ratio = f
        for m in entry["modules"]:
            ratios[m] = ratio
    return ratios


def plot_sensitivity(result: dict[str, Any], path: str | Path) -> Path:
    """Draw accuracy vs pruned fraction, one line per group (Li et al. Fig. 2b), as a PNG; return the path."""
    from matplotlib.figure import Figure  # lazy, and no pyplot: no global backend or figure state

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for label, entry in result["layers"].items():
        ax.plot([0.0] + entry["fractions"], [result["baseline"]] + entry["accuracy"], marker="o",
                markersize=3, linewidth=1.2, label=label)
    ax.axhline(result["baseline"], color="gray", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("fraction of channels pruned (layer pruned alone, no retraining)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"Pruning sensitivity ({result.get('criterion', '?')})")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=6, ncol=2 if len(result["layers"]) > 12 else 1, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, bbox_inches="tight")
    return out


def _classes_removed(graph: Any, group: Any, plan: Any) -> int:
    """How many of ``group``'s channel classes ``plan`` removes."""
    from deploy_prune.surgery import roots_from_plan

    roots = roots_from_plan(graph, plan)
    return sum(1 for ch in group.channels if ch.root in roots)
