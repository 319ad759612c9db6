"""``sensitivity``: prune one layer at a time, smallest-L1 vs random vs largest-L1 filters (Li et al. 2017, Fig. 2).

Li et al. prune each conv layer of VGG-16 alone at increasing fractions and plot CIFAR-10 accuracy without
retraining (Fig. 2b) and after retraining (Fig. 2c); §4.2 (Fig. 6 of the arXiv version) compares pruning the
smallest-L1 filters with random filters and with the largest-L1 ones: smallest first loses least.

Here: ``builtin:mnist_cnn`` (five 3x3 conv layers, 32-32-64-64-128, with BN) with its shipped weights, swept by
:func:`deploy_prune.sensitivity.sensitivity` three times: with the registered ``l1`` and ``random`` criteria
and with :class:`LargestL1`, the ``l1`` criterion's scores negated (not registered: it exists only as the
paper's control). Each pruned trial's BatchNorm running statistics are re-estimated from 20 training batches
(no gradient step) before it is measured: with the stale statistics every layer of this network falls to
chance accuracy at 20% pruned (its first layer: 10.3%, 97.3% once re-estimated), which says nothing about the
filters removed; the stale smallest-L1 sweep is kept as ``smallest_l1_stale_bn``. Fig. 2c: the full run also retrains each (layer, fraction) trial with the product's
finetuning recipe for ``retrain_epochs`` and measures again.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch

from deploy_prune.criteria.l1 import L1Criterion
from deploy_prune.reproduce.common import SHAPE, Context, baseline_cnn, figure, reestimate_bn, table
from deploy_prune.sensitivity import sensitivity as sweep
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select
from deploy_prune.train import evaluate

NAME = "sensitivity"
TITLE = "Per-layer sensitivity: smallest-L1 vs random vs largest-L1 (Li et al. 2017, Fig. 2b/2c)"
PAPER = {
    "source": "Li et al. 2017, Fig. 2(b)/(c) and sec. 4.2; VGG-16 on CIFAR-10",
    "claim": "Pruning the smallest-L1 filters costs less accuracy than random filters, and random less than the "
             "largest-L1 filters; some layers (VGG-16 conv1, conv8-13) tolerate 50% pruning with little loss, "
             "others (conv2-7) are sensitive.",
}
QUICK = {"fractions": [0.25, 0.5, 0.75], "max_batches": 8, "retrain_epochs": 0, "retrain_fractions": []}
FULL = {"fractions": [0.1, 0.2, 0.3, 0.5, 0.7, 0.9], "max_batches": None, "retrain_epochs": 1,
        "retrain_fractions": [0.3, 0.5, 0.9]}
RANKINGS = ("smallest_l1", "random", "largest_l1")


class LargestL1(L1Criterion):
    """The paper's control: the *largest* filter L1 norms are pruned first (the l1 scores, negated)."""

    name: ClassVar[str] = "largest_l1"

    def score(self, graph: Any, group: Any, removed: frozenset[int]) -> torch.Tensor:
        return -super().score(graph, group, removed)


def _retrain(ctx: Context, model: Any, module: str, fraction: float, epochs: int, seed: int) -> float:
    """Fig. 2c: prune ``module``'s group alone by smallest L1 at ``fraction``, retrain, measure."""
    from deploy_prune import criteria

    work = copy.deepcopy(model)
    graph = analyze(work, SHAPE)
    crit = criteria.create("l1")
    plan = select(graph, crit, PlanConfig(ratio=0.0, max_layer_ratio=1.0, layer_ratios={module: fraction}))
    prune_channels(work, graph, plan)
    reestimate_bn(work, ctx.data.train)
    ctx.trainer(epochs, seed).finetune(work, f"retrain {module} at {fraction}")
    return round(evaluate(work, ctx.data.val), 2)


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings(QUICK, FULL)
    model = baseline_cnn(ctx)
    seed = ctx.seeds_for(NAME)[0]
    crits: dict[str, Any] = {"smallest_l1": "l1", "random": "random", "largest_l1": LargestL1(),
                             "smallest_l1_stale_bn": "l1"}
    sweeps = {}
    for name, crit in crits.items():
        ctx.say(f"sensitivity: {name} sweep")
        bn = None if name.endswith("stale_bn") else (lambda m: reestimate_bn(m, ctx.data.train))
        sweeps[name] = sweep(model, ctx.data, SHAPE, criterion=crit, fractions=tuple(s["fractions"]),
                             max_batches=s["max_batches"], seed=seed, progress=False, after_prune=bn)
    baseline = sweeps["smallest_l1"]["baseline"]
    rows = []
    for label, entry in sweeps["smallest_l1"]["layers"].items():
        for i, f in enumerate(entry["fractions"]):
            row = {"layer": label, "channels": entry["size"], "fraction": f}
            for name in crits:
                row[name] = round(sweeps[name]["layers"][label]["accuracy"][i], 2)
            row["smallest_l1_retrained"] = None
            if f in s["retrain_fractions"] and s["retrain_epochs"] > 0:
                ctx.say(f"sensitivity: retraining {label} pruned {f:.0%} (Fig. 2c)")
                row["smallest_l1_retrained"] = _retrain(ctx, model, entry["modules"][0], f, s["retrain_epochs"], seed)
            rows.append(row)
    mean = {n: round(sum(r[n] for r in rows) / len(rows), 2) for n in RANKINGS}
    order_ok = sum(1 for r in rows if r["smallest_l1"] >= r["random"] >= r["largest_l1"])
    small_beats_large = sum(1 for r in rows if r["smallest_l1"] >= r["largest_l1"])
    holds = mean["smallest_l1"] >= mean["random"] >= mean["largest_l1"]
    return {
        "paper": PAPER, "settings": {**s, "model": "builtin:mnist_cnn (shipped weights)", "seed": seed},
        "baseline_accuracy": round(baseline, 2), "rows": rows,
        "summary": {"mean_accuracy": mean, "points": len(rows), "points_in_paper_order": order_ok,
                    "points_smallest_at_least_largest": small_beats_large},
        "finding": {"claim": "smallest-L1 >= random >= largest-L1 (mean accuracy over every layer and fraction)",
                    "holds": holds,
                    "measured": f"mean accuracy {mean['smallest_l1']:.2f} / {mean['random']:.2f} / "
                                f"{mean['largest_l1']:.2f} (smallest / random / largest); the paper's order at "
                                f"{order_ok} of {len(rows)} (layer, fraction) points"},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    layers = list(dict.fromkeys(r["layer"] for r in result["rows"]))
    fig, axes = figure(4.0 * len(RANKINGS), 4.0, ncols=len(RANKINGS))
    base = result["baseline_accuracy"]
    for ax, name in zip(axes, RANKINGS):
        for label in layers:
            pts = [r for r in result["rows"] if r["layer"] == label]
            ax.plot([0.0] + [r["fraction"] for r in pts], [base] + [r[name] for r in pts], marker="o",
                    markersize=3, label=label)
            retrained = [r for r in pts if r.get("smallest_l1_retrained") is not None]
            if name == "smallest_l1" and retrained:
                ax.plot([r["fraction"] for r in retrained], [r["smallest_l1_retrained"] for r in retrained],
                        linestyle="none", marker="x", color=ax.lines[-1].get_color())
        ax.set_title(name.replace("_", " ") + (" (x: retrained)" if name == "smallest_l1" else ""), fontsize=9)
        ax.set_xlabel("fraction of the layer's filters pruned")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Li et al. Fig. 2b/2c on mnist_cnn / mnist5k: one layer pruned at a time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict[str, Any]) -> list[str]:
    rows = [[r["layer"], r["fraction"], r["smallest_l1"], r["random"], r["largest_l1"], r["smallest_l1_retrained"],
             r.get("smallest_l1_stale_bn")] for r in result["rows"]]
    m = result["summary"]["mean_accuracy"]
    return [f"Baseline accuracy {result['baseline_accuracy']:.2f}%. Accuracy with BatchNorm statistics re-estimated "
            f"after pruning; mean over all points: smallest-L1 {m['smallest_l1']:.2f}, random {m['random']:.2f}, "
            f"largest-L1 {m['largest_l1']:.2f}.", "",
            *table(["layer", "fraction pruned", "smallest L1", "random", "largest L1", "smallest L1, retrained",
                    "smallest L1, stale BN stats"], rows)]
