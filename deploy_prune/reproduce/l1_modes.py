"""``l1_modes``: independent vs greedy L1 scoring across consecutive layers (Li et al. 2017, sec. 3.2, Fig. 3).

*Independent* sums every input kernel of a filter, including those that read feature maps already pruned in
the layer before; *greedy* leaves them out. Li et al.: greedy is better when many filters are pruned.

Here: ``builtin:mnist_cnn`` (shipped weights) pruned by the ``l1`` criterion with ``l1_mode`` independent and
greedy at the same ratio (the product's pruning stage, ``round_to=1`` so both keep exactly ``int(n(1-r))``
channels per layer), each finetuned with the same budget, on every seed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from deploy_prune.criteria.l1 import L1Options
from deploy_prune.prune import prune_structured
from deploy_prune.reproduce.common import SHAPE, Context, baseline_cnn, figure, mean_std, pm, table
from deploy_prune.spec import PruneSpec

NAME = "l1_modes"
TITLE = "Independent vs greedy L1 at equal ratio (Li et al. 2017, sec. 3.2)"
PAPER = {"source": "Li et al. 2017, sec. 3.2 and Fig. 3 (VGG-16 / CIFAR-10)",
         "claim": "Greedy (kernels of already-pruned maps left out of the sum) is better than independent when "
                  "many filters are pruned; the two agree at small ratios."}
QUICK = {"ratios": [0.5, 0.8], "epochs": 1}
FULL = {"ratios": [0.5, 0.7, 0.85], "epochs": 2}
MODES = ("independent", "greedy")


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings(QUICK, FULL)
    base = baseline_cnn(ctx)
    rows = []
    for ratio in s["ratios"]:
        for mode in MODES:
            for seed in ctx.seeds_for(NAME):
                ctx.say(f"l1_modes: {mode} at ratio {ratio}, seed {seed}")
                spec = PruneSpec(criterion="l1", options=L1Options(l1_mode=mode), ratio=ratio, round_to=1,
                                 max_layer_ratio=0.95, seed=seed)
                trainer = ctx.trainer(s["epochs"], seed)
                res = prune_structured(copy.deepcopy(base), spec, SHAPE, trainer)
                rows.append({"ratio": ratio, "mode": mode, "seed": seed, "params": res.steps[-1]["params"],
                             "accuracy_pruned": res.accuracy_before_finetune, "accuracy_pruned_bn": trainer.bn_log[0],
                             "accuracy_finetuned": res.steps[-1]["accuracy_finetuned"]})
    summary = []
    for ratio in s["ratios"]:
        entry: dict[str, Any] = {"ratio": ratio}
        for mode in MODES:
            sel = [r for r in rows if r["ratio"] == ratio and r["mode"] == mode]
            entry[mode] = {k: mean_std(r[k] for r in sel) for k in ("accuracy_pruned", "accuracy_pruned_bn",
                                                                   "accuracy_finetuned")}
        summary.append(entry)
    top = summary[-1]
    gain = top["greedy"]["accuracy_pruned_bn"][0] - top["independent"]["accuracy_pruned_bn"][0]
    gain_ft = top["greedy"]["accuracy_finetuned"][0] - top["independent"]["accuracy_finetuned"][0]
    return {"paper": PAPER, "settings": {**s, "model": "builtin:mnist_cnn (shipped weights)", "round_to": 1},
            "rows": rows, "summary": summary,
            "finding": {"claim": "greedy >= independent at the largest ratio",
                        "holds": gain >= 0 and gain_ft >= -0.1,
                        "measured": f"at ratio {top['ratio']}: greedy - independent = {gain:+.2f} points before "
                                    f"finetuning, {gain_ft:+.2f} after"}}


def plot(result: dict[str, Any], path: Path) -> None:
    fig, ax = figure(6.0, 4.0)
    ratios = [e["ratio"] for e in result["summary"]]
    for mode, marker in zip(MODES, "os"):
        for key, style in (("accuracy_pruned_bn", "--"), ("accuracy_finetuned", "-")):
            ms = [e[mode][key] for e in result["summary"]]
            ax.errorbar(ratios, [m[0] for m in ms], yerr=[m[1] or 0 for m in ms], marker=marker, linestyle=style,
                        capsize=3, label=f"{mode}, {'before' if key == 'accuracy_pruned_bn' else 'after'} finetuning")
    ax.set_xlabel("fraction of channels pruned in every layer")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("L1 independent vs greedy (mnist_cnn / mnist5k)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict[str, Any]) -> list[str]:
    rows = []
    for e in result["summary"]:
        rows.append([e["ratio"], pm(*e["independent"]["accuracy_pruned"]), pm(*e["greedy"]["accuracy_pruned"]),
                     pm(*e["independent"]["accuracy_pruned_bn"]), pm(*e["greedy"]["accuracy_pruned_bn"]),
                     pm(*e["independent"]["accuracy_finetuned"]), pm(*e["greedy"]["accuracy_finetuned"])])
    # "pruned" is what prune_structured reports: BN statistics already re-estimated by the run (TrainSpec's
    # bn_recalib_batches, 50); the second pair re-estimates again on a copy with 20 batches.
    return table(["ratio", "independent, pruned (run's BN re-estimate)", "greedy, pruned (run's BN re-estimate)",
                  "independent, BN re-estimated on a copy", "greedy, BN re-estimated on a copy",
                  "independent, finetuned", "greedy, finetuned"], rows)
