"""``apoz_lenet``: iterative trimming of LeNet by APoZ (Hu et al. 2016, Table 2).

Hu et al. train LeNet (20-50-500-10) on MNIST, measure every neuron's Average Percentage of Zeros after its
ReLU on validation images, trim the neurons of CONV2 and FC1 whose APoZ is more than one standard deviation
above their layer's mean, retrain from the surviving weights, and iterate: four trims take it to 20-24-252-10,
3.85x fewer parameters, at 99.26% against 99.31% (-0.05 points).

Here: ``builtin:lenet5`` (a ReLU after each conv too, so CONV2 has post-ReLU zeros to count) trained from a
seeded init with Adam. Each iteration scores the channels with the registered ``apoz`` criterion (calibrated
on the whole validation split), applies the paper's rule (APoZ > mean + 1 std, per layer) to conv2 and fc1,
removes those channels with the product's surgery (``choose`` / ``plan_from_roots`` / ``prune_channels``),
measures (*initial accuracy*) and retrains with the product's finetuning recipe (*final accuracy*).
Departure: the paper does not say how many epochs it retrained; mnist5k has 4,000 training digits, not 60,000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy_prune import criteria
from deploy_prune.criteria.apoz import APoZOptions
from deploy_prune.metrics import count_params
from deploy_prune.reproduce.common import SHAPE, Context, builtin, figure, mean_std, pm, table, widths
from deploy_prune.surgery import analyze, choose, plan_from_roots, prune_channels
from deploy_prune.train import evaluate, train

NAME = "apoz_lenet"
TITLE = "APoZ iterative trimming of LeNet (Hu et al. 2016, Table 2)"
TRIMMED = ("3", "7")  # conv2 and fc1 of builtin:lenet5
PAPER = {"source": "Hu et al. 2016, Table 2 (LeNet on MNIST, 60K training images)",
         "rows": [
             {"config": "20-50-500-10", "compression_rate": 1.00, "initial_accuracy": 10.52, "final_accuracy": 99.31},
             {"config": "20-41-426-10", "compression_rate": 1.41, "initial_accuracy": 98.75, "final_accuracy": 99.29},
             {"config": "20-31-349-10", "compression_rate": 2.24, "initial_accuracy": 95.34, "final_accuracy": 99.30},
             {"config": "20-26-293-10", "compression_rate": 3.11, "initial_accuracy": 88.21, "final_accuracy": 99.25},
             {"config": "20-24-252-10", "compression_rate": 3.85, "initial_accuracy": 96.75, "final_accuracy": 99.26}],
         "claim": "3.85x fewer parameters at -0.05 points after four trimming iterations"}
QUICK = {"train_epochs": 8, "iterations": 4, "retrain_epochs": 2, "std_above_mean": 1.0}
FULL = {"train_epochs": 20, "iterations": 4, "retrain_epochs": 4, "std_above_mean": 1.0}


def _trim_counts(graph: Any, crit: Any, k: float) -> tuple[dict[int, int], dict[str, float]]:
    """Kept channels per group: conv2 and fc1 lose every channel with APoZ > mean + k std of the layer."""
    counts: dict[int, int] = {}
    means: dict[str, float] = {}
    for g in graph.groups:
        if not set(g.modules) & set(TRIMMED):
            continue
        vals = [crit.apoz[ch.root] for ch in g.channels if ch.root in crit.apoz]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        above = sum(1 for v in vals if v > mean + k * std)
        counts[g.id] = max(1, g.size - above)
        means[g.modules[0]] = round(mean, 4)
    return counts, means


def _trim_run(ctx: Context, s: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    model = builtin("lenet5", seed)
    dense_params = count_params(model)
    initial = round(evaluate(model, ctx.data.val), 2)  # the paper's first row: untrained
    ctx.say(f"apoz_lenet: training LeNet-5 for {s['train_epochs']} epochs (seed {seed})")
    train(model, ctx.data.train, epochs=s["train_epochs"], lr=1e-3, optimizer="adam", seed=seed,
          desc="train lenet5", progress=ctx.progress)
    rows = [{"iteration": 0, "config": "-".join(map(str, widths(model))), "compression_rate": 1.0,
             "initial_accuracy": initial, "final_accuracy": round(evaluate(model, ctx.data.val), 2),
             "mean_apoz": None}]
    for it in range(1, s["iterations"] + 1):
        graph = analyze(model, SHAPE)
        crit = criteria.create("apoz", APoZOptions(calib_batches=10_000))
        crit.prepare(model, graph, criteria.ScoreContext(data=ctx.data, seed=seed, progress=ctx.progress))
        counts, means = _trim_counts(graph, crit, s["std_above_mean"])
        prune_channels(model, graph, plan_from_roots(graph, choose(graph, crit, counts)))
        acc0 = round(evaluate(model, ctx.data.val), 2)
        ctx.say(f"apoz_lenet: iteration {it}: {'-'.join(map(str, widths(model)))}, retraining")
        ctx.trainer(s["retrain_epochs"], seed).finetune(model, f"retrain trim {it}")
        rows.append({"iteration": it, "config": "-".join(map(str, widths(model))),
                     "compression_rate": round(dense_params / count_params(model), 2), "initial_accuracy": acc0,
                     "final_accuracy": round(evaluate(model, ctx.data.val), 2), "mean_apoz": means})
    return rows


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings(QUICK, FULL)
    seeds = ctx.seeds_for(NAME)
    per_seed = {seed: _trim_run(ctx, s, seed) for seed in seeds}
    rows = per_seed[seeds[0]]
    summary = []
    for i in range(s["iterations"] + 1):
        its = [per_seed[sd][i] for sd in seeds]
        drop = [its[j]["final_accuracy"] - per_seed[sd][0]["final_accuracy"] for j, sd in enumerate(seeds)]
        summary.append({"iteration": i, "compression_rate": mean_std(r["compression_rate"] for r in its),
                        "final_accuracy": mean_std(r["final_accuracy"] for r in its),
                        "change_vs_unpruned": mean_std(drop)})
    # the finding: the largest mean compression whose mean accuracy change stays within 0.3 points
    ok = [e for e in summary if e["change_vs_unpruned"][0] >= -0.3]
    best = max(ok, key=lambda e: e["compression_rate"][0])
    return {"paper": PAPER, "settings": {**s, "model": "builtin:lenet5", "seeds": seeds, "trimmed": ["conv2 (3)",
                                                                                                   "fc1 (7)"]},
            "rows": rows, "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary,
            "finding": {"claim": "at least 2x compression within 0.3 points of the unpruned accuracy",
                        "holds": best["compression_rate"][0] >= 2.0,
                        "measured": f"{best['compression_rate'][0]:.2f}x at {best['change_vs_unpruned'][0]:+.2f} "
                                    f"points (mean of {len(seeds)} seed(s), iteration {best['iteration']}); "
                                    f"last iteration {summary[-1]['compression_rate'][0]:.2f}x at "
                                    f"{summary[-1]['change_vs_unpruned'][0]:+.2f}"}}


def plot(result: dict[str, Any], path: Path) -> None:
    fig, ax = figure(6.5, 4.0)
    p = PAPER["rows"]
    base_p = p[0]["final_accuracy"]
    ax.plot([r["compression_rate"] for r in p], [r["final_accuracy"] - base_p for r in p], marker="s",
            label="Hu et al. Table 2 (MNIST 60K)")
    for seed, rows in result["per_seed"].items():
        base = rows[0]["final_accuracy"]
        ax.plot([r["compression_rate"] for r in rows], [r["final_accuracy"] - base for r in rows], marker="o",
                label=f"here, seed {seed} (mnist5k)")
    ax.axhline(-0.3, color="gray", linestyle="--", linewidth=1, label="-0.3 points")
    ax.set_xlabel("parameter compression rate (x)")
    ax.set_ylabel("accuracy change after retraining (points)")
    ax.set_title("APoZ trimming of LeNet conv2 + fc1", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict[str, Any]) -> list[str]:
    paper = PAPER["rows"]
    rows = []
    ours = result["rows"]
    for i in range(max(len(ours), len(paper))):
        r = ours[i] if i < len(ours) else {}
        pr = paper[i] if i < len(paper) else {}
        rows.append([r.get("config"), r.get("compression_rate"), r.get("initial_accuracy"), r.get("final_accuracy"),
                     pr.get("config"), pr.get("compression_rate"), pr.get("initial_accuracy"),
                     pr.get("final_accuracy")])
    out = table(["config", "compression", "initial acc", "final acc", "paper config", "paper compression",
                 "paper initial", "paper final"], rows)
    if len(result["per_seed"]) > 1:
        out += ["", f"Mean ± std over seeds {', '.join(result['per_seed'])}:", ""]
        out += table(["iteration", "compression", "final accuracy", "change vs unpruned"],
                     [[e["iteration"], pm(*e["compression_rate"]), pm(*e["final_accuracy"]),
                       pm(*e["change_vs_unpruned"])] for e in result["summary"]])
    return out
