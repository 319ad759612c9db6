"""``lottery``: winning tickets vs random re-initialisation on LeNet-300-100 (Frankle & Carbin 2019, Fig. 1/3).

The paper trains LeNet-300-100 on MNIST (Adam 1.2e-3, batch 60, 50K iterations, Gaussian Glorot init), prunes
20% of each hidden layer's surviving weights and 10% of the output layer's per round by magnitude, rewinds the
survivors to their initial values and repeats. At every level it reports the early-stopping iteration (the
minimum *validation* loss, on 5K images held out of the training set) and the test accuracy at that iteration,
for the ticket and for the same mask re-initialised at random: tickets learn faster and reach higher accuracy
down to ~3.6% of the weights; the random re-initialisations degrade much earlier.

Here: ``builtin:lenet300`` with Glorot-normal weights, iterative magnitude pruning by the product's
:func:`deploy_prune.train.lottery.find_ticket` (``scope="layer"``: the output layer at half rate; rewinding to
theta_0). At every level (its ``on_round`` hook, right after the rewind) the ticket and a random
re-initialisation with the same mask (new Glorot draw, masks re-applied after every step) are trained with
the same budget while the validation loss is measured every ``eval_every`` iterations on 500 training digits
held out from training; accuracy is measured on the 1,000 validation digits at the early-stop iteration.
Departures: mnist5k (3,500 training digits here, against 55,000) and a few hundred iterations instead of 50K;
the quick run prunes 36% per round (two of the paper's rounds at once) to reach the same sparsities in
fewer levels.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from deploy_prune.data import DataBundle
from deploy_prune.reproduce.common import Context, builtin, figure, mean_std, pm, table
from deploy_prune.train import evaluate, train
from deploy_prune.train.lottery import find_ticket, zero_masked
from deploy_prune.unstructured import weight_layers

NAME = "lottery"
TITLE = "Lottery tickets vs random re-initialisation, LeNet-300-100 (Frankle & Carbin 2019, Fig. 1)"
PAPER = {"source": "Frankle & Carbin 2019, Fig. 1 and Fig. 3 (LeNet-300-100, MNIST, 50K iterations, 5 trials)",
         "claim": "Winning tickets stop early sooner and reach higher test accuracy than random re-initialisations "
                  "of the same mask; tickets match the dense network down to ~3.6% of the weights (dense ~98%), "
                  "learn faster down to ~21%; random re-initialisations degrade much earlier.",
         "points": [{"weights_remaining": 100.0, "ticket_accuracy": 98.0, "note": "dense, approximate [R]"},
                    {"weights_remaining": 3.6, "ticket_accuracy": 98.0, "note": "ticket still matches dense"}]}
QUICK = {"epochs": 6, "rate_per_round": 0.36, "rounds": 8, "eval_every": 10, "lr": 1.2e-3, "batch_size": 60,
         "held_out": 500}
FULL = {"epochs": 10, "rate_per_round": 0.2, "rounds": 16, "eval_every": 10, "lr": 1.2e-3, "batch_size": 60,
        "held_out": 500}


def _glorot(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in weight_layers(model).values():
            fan_out, fan_in = m.weight.shape[0], m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / (fan_in + fan_out)) ** 0.5)
            if m.bias is not None:
                m.bias.zero_()
    return model


def _split(ctx: Context, s: dict[str, Any]) -> DataBundle:
    """mnist5k's training digits minus ``held_out`` of them, which become the early-stopping validation set."""
    ds = ctx.data.train.dataset
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    held, rest = order[:s["held_out"]], order[s["held_out"]:]
    return DataBundle(DataLoader(Subset(ds, rest), batch_size=s["batch_size"], shuffle=True,
                                 generator=torch.Generator().manual_seed(0)),
                      DataLoader(Subset(ds, held), batch_size=len(held)), ctx.data.num_classes,
                      ctx.data.input_shape, "mnist5k train split")


def _train_es(model: nn.Module, masks: dict[str, torch.Tensor], split: DataBundle, test: DataLoader,
              s: dict[str, Any], seed: int, desc: str, progress: bool) -> dict[str, Any]:
    """Train with masks re-applied after every step; early stopping = the iteration of minimum validation loss."""
    x_val, y_val = next(iter(split.val))
    best = {"loss": float("inf"), "iter": 0, "state": copy.deepcopy(model.state_dict())}
    step = 0

    def after_step(m: nn.Module) -> None:
        nonlocal step
        zero_masked(m, masks)
        step += 1
        if step % s["eval_every"] == 0:
            with torch.no_grad():
                loss = float(F.cross_entropy(m(x_val), y_val))
            if loss < best["loss"]:
                best.update(loss=loss, iter=step, state=copy.deepcopy(m.state_dict()))

    zero_masked(model, masks)
    train(model, split.train, epochs=s["epochs"], lr=s["lr"], optimizer="adam", after_step=after_step, seed=seed,
          desc=desc, progress=progress)
    final = evaluate(model, test)
    model.load_state_dict(best["state"])
    return {"es_iter": best["iter"], "es_accuracy": round(evaluate(model, test), 2), "final_accuracy": round(final, 2)}


def _levels(ctx: Context, s: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    split = _split(ctx, s)
    init = _glorot(builtin("lenet300", seed), seed)
    layers = weight_layers(init)
    total = sum(m.weight.numel() for m in layers.values())
    out_name = list(layers)[-1]
    n = s["rounds"]
    kept = sum(m.weight.numel() * ((1 - s["rate_per_round"] / 2) ** n if name == out_name else
                                   (1 - s["rate_per_round"]) ** n) for name, m in layers.items())
    rows: list[dict[str, Any]] = []

    def on_round(r: int, net: nn.Module) -> None:
        masks = {name: m.weight.detach() != 0 for name, m in weight_layers(net).items()}
        remaining = 100.0 * sum(int(v.sum()) for v in masks.values()) / total
        ctx.say(f"lottery: seed {seed}, level {r}: {remaining:.1f}% of weights, ticket and random re-init")
        ticket = _train_es(copy.deepcopy(net), masks, split, ctx.data.val, s, seed, f"ticket {r}", ctx.progress)
        reinit = _train_es(_glorot(copy.deepcopy(init), 10_000 * (seed + 1) + r), masks, split, ctx.data.val, s,
                           seed, f"reinit {r}", ctx.progress)
        rows.append({"level": r, "seed": seed, "weights_remaining": round(remaining, 2),
                     "ticket_accuracy": ticket["es_accuracy"], "reinit_accuracy": reinit["es_accuracy"],
                     "ticket_early_stop_iter": ticket["es_iter"], "reinit_early_stop_iter": reinit["es_iter"],
                     "ticket_final_accuracy": ticket["final_accuracy"],
                     "reinit_final_accuracy": reinit["final_accuracy"]})

    find_ticket(init, split, target_sparsity=1 - kept / total, rounds=n, rate_per_round=s["rate_per_round"],
                scope="layer", epochs_per_round=s["epochs"], lr=s["lr"], optimizer="adam", seed=seed,
                on_round=on_round, progress=ctx.progress)
    return rows


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings(QUICK, FULL)
    per_seed = [row for seed in ctx.seeds_for(NAME) for row in _levels(ctx, s, seed)]
    levels = sorted({r["level"] for r in per_seed})
    rows = []
    for lv in levels:
        sel = [r for r in per_seed if r["level"] == lv]
        row: dict[str, Any] = {"level": lv, "weights_remaining": sel[0]["weights_remaining"]}
        for k in ("ticket_accuracy", "reinit_accuracy", "ticket_early_stop_iter", "reinit_early_stop_iter"):
            m, sd = mean_std(r[k] for r in sel)
            row[k], row[k + "_std"] = m, sd
        rows.append(row)
    sparse = [r for r in rows if r["level"] > 0][len(rows[1:]) // 2:]  # the sparser half of the pruned levels
    wins = sum(1 for r in sparse if r["ticket_accuracy"] > r["reinit_accuracy"])
    faster = sum(1 for r in sparse if r["ticket_early_stop_iter"] <= r["reinit_early_stop_iter"])
    gap = sum(r["ticket_accuracy"] - r["reinit_accuracy"] for r in sparse) / max(1, len(sparse))
    return {"paper": PAPER, "settings": {**s, "model": "builtin:lenet300, Glorot-normal init", "seeds": ctx.seeds_for(NAME),
                                         "scope": "layer (output layer at half rate)",
                                         "iterations_per_training": s["epochs"] * -(-3500 // s["batch_size"])},
            "rows": rows, "per_seed": per_seed,
            "finding": {"claim": "winning tickets beat random re-initialisation at the sparser half of the levels",
                        "holds": wins > len(sparse) / 2,
                        "measured": f"ticket > reinit at {wins} of {len(sparse)} sparser levels "
                                    f"({sparse[0]['weights_remaining']:.1f}% .. {sparse[-1]['weights_remaining']:.1f}% "
                                    f"of weights), mean gap {gap:+.2f} points; ticket stops early no later than "
                                    f"reinit at {faster} of {len(sparse)}"}}


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = figure(11.0, 4.0, ncols=2)
    x = [r["weights_remaining"] for r in result["rows"]]
    for kind, style in (("ticket", "-"), ("reinit", "--")):
        label = "winning ticket" if kind == "ticket" else "random re-init"
        ax1.errorbar(x, [r[f"{kind}_early_stop_iter"] for r in result["rows"]],
                     yerr=[r[f"{kind}_early_stop_iter_std"] or 0 for r in result["rows"]], linestyle=style,
                     marker="o", capsize=2, label=label)
        ax2.errorbar(x, [r[f"{kind}_accuracy"] for r in result["rows"]],
                     yerr=[r[f"{kind}_accuracy_std"] or 0 for r in result["rows"]], linestyle=style, marker="o",
                     capsize=2, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("percent of weights remaining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("early-stop iteration (min validation loss)")
    ax2.set_ylabel("accuracy at early stop (%)")
    fig.suptitle("Frankle & Carbin Fig. 1 on LeNet-300-100 / mnist5k", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict[str, Any]) -> list[str]:
    return table(["weights remaining %", "ticket acc", "reinit acc", "ticket early-stop iter",
                  "reinit early-stop iter"],
                 [[r["weights_remaining"], pm(r["ticket_accuracy"], r["ticket_accuracy_std"]),
                   pm(r["reinit_accuracy"], r["reinit_accuracy_std"]),
                   pm(r["ticket_early_stop_iter"], r["ticket_early_stop_iter_std"], 0),
                   pm(r["reinit_early_stop_iter"], r["reinit_early_stop_iter_std"], 0)] for r in result["rows"]])
