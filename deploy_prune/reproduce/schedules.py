"""``schedules``: prune once and retrain vs prune and retrain iteratively, at equal total epochs (Li et al. 2017,
sec. 3.4).

Li et al. retrain once after pruning every layer (all their results), and note that pruning and retraining
iteratively recovers more for sensitive layers or heavy pruning but "needs more epochs". Here both get the
same total finetuning epochs: *once* prunes to the ratio in one step and finetunes ``steps * epochs`` epochs;
*iterative* uses the pruning stage's ``steps`` (each step removes ``1 - (1 - r)^(1/steps)`` of what is left in
every layer, then finetunes ``epochs``). Departure: Li et al.'s iterative schedule goes layer by layer; the
product's steps prune every layer a little at each step.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from deploy_prune.prune import prune_structured
from deploy_prune.reproduce.common import SHAPE, Context, baseline_cnn, figure, mean_std, pm, table
from deploy_prune.spec import PruneSpec

NAME = "schedules"
TITLE = "Prune once and retrain vs iterative, at equal total epochs (Li et al. 2017, sec. 3.4)"
PAPER = {"source": "Li et al. 2017, sec. 3.4 (no table: a qualitative statement)",
         "claim": "Prune-once-and-retrain recovers the accuracy for moderate pruning; iterative pruning and "
                  "retraining may do better for heavy pruning, at the cost of more epochs."}
QUICK = {"ratios": [0.8], "steps": 3, "epochs_per_step": 1}
FULL = {"ratios": [0.8, 0.9], "steps": 3, "epochs_per_step": 1}


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings(QUICK, FULL)
    base = baseline_cnn(ctx)
    total = s["steps"] * s["epochs_per_step"]
    rows = []
    for ratio in s["ratios"]:
        for schedule, steps, epochs in (("once", 1, total), ("iterative", s["steps"], s["epochs_per_step"])):
            for seed in ctx.seeds_for(NAME):
                ctx.say(f"schedules: {schedule} to ratio {ratio}, seed {seed}")
                spec = PruneSpec(criterion="l1", ratio=ratio, round_to=1, steps=steps, max_layer_ratio=0.95,
                                 seed=seed)
                trainer = ctx.trainer(epochs, seed)
                res = prune_structured(copy.deepcopy(base), spec, SHAPE, trainer)
                rows.append({"ratio": ratio, "schedule": schedule, "seed": seed, "steps": steps,
                             "epochs_total": steps * epochs, "params": res.steps[-1]["params"],
                             "accuracy_first_prune": res.accuracy_before_finetune,
                             "accuracy_first_prune_bn": trainer.bn_log[0],
                             "accuracy_final": res.steps[-1]["accuracy_finetuned"],
                             "per_step": [{"params": r["params"], "accuracy_pruned": r["accuracy_pruned"],
                                           "accuracy_finetuned": r["accuracy_finetuned"]} for r in res.steps]})
    summary = []
    for ratio in s["ratios"]:
        e: dict[str, Any] = {"ratio": ratio}
        for schedule in ("once", "iterative"):
            sel = [r for r in rows if r["ratio"] == ratio and r["schedule"] == schedule]
            e[schedule] = {"accuracy_final": mean_std(r["accuracy_final"] for r in sel),
                           "params": sel[0]["params"]}
        summary.append(e)
    top = summary[-1]
    diff = top["iterative"]["accuracy_final"][0] - top["once"]["accuracy_final"][0]
    return {"paper": PAPER, "settings": {**s, "epochs_total": total, "model": "builtin:mnist_cnn (shipped weights)",
                                         "criterion": "l1", "round_to": 1},
            "rows": rows, "summary": summary,
            "finding": {"claim": "iterative >= once at the heaviest ratio, at equal epochs (the paper expects iterative to "
                                 "help at heavy pruning but to need more epochs)", "holds": diff >= 0,
                        "measured": f"at ratio {top['ratio']}: iterative - once = {diff:+.2f} points "
                                    f"({total} epochs each)"}}


def plot(result: dict[str, Any], path: Path) -> None:
    fig, ax = figure(6.0, 4.0)
    ratios = [e["ratio"] for e in result["summary"]]
    for schedule, marker in (("once", "o"), ("iterative", "s")):
        ms = [e[schedule]["accuracy_final"] for e in result["summary"]]
        ax.errorbar(ratios, [m[0] for m in ms], yerr=[m[1] or 0 for m in ms], marker=marker, capsize=3,
                    label=schedule)
    ax.set_xlabel("fraction of channels pruned in every layer")
    ax.set_ylabel("validation accuracy after finetuning (%)")
    ax.set_title(f"Once vs iterative, {result['settings']['epochs_total']} finetuning epochs each", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict[str, Any]) -> list[str]:
    rows = [[e["ratio"], e["once"]["params"], pm(*e["once"]["accuracy_final"]), pm(*e["iterative"]["accuracy_final"])]
            for e in result["summary"]]
    return table(["ratio", "params", "once + retrain", "iterative"], rows)
