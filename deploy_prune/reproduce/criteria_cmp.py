"""``criteria``: every registered criterion at equal measured speedup, finetuned with the same budget, mean ± std
over seeds (Blalock et al. 2020's recommendations: one baseline checkpoint, one finetuning budget, several
seeds, a random control, speed measured rather than counted).

How the widths are fixed: the latency target search (:func:`deploy_prune.target.search`, the same search as
``run --target-speedup``) runs once on the shipped ``builtin:mnist_cnn`` with L1 scores and measures its
probes on ONNX Runtime (CPU provider) until the structured model is within ``[X, 1.1 X]`` of the target. Every
criterion then keeps *the same number of channels in every group* (so the same architecture, hence the same
latency), choosing *which* channels with its own scores (``surgery.choose``), and is finetuned with the
product's recipe for the same epochs. One interleaved benchmark at the end measures every criterion's model
(seed 0) against dense. If the target cannot be reached on this machine, every criterion prunes the same
uniform ratio instead (the result says which).

Departures: the product's own ``--target-speedup`` lets each criterion's scores steer the widths as well; here
they are fixed so that only the channel choice differs. ``slimming`` runs its own sparsity training
(``sparsity_epochs``: 2, the criterion's default, in the full run; 1 in the quick one) before choosing, as it
does in ``run``; ``lottery`` is unstructured: its row
is the ticket found by iterative magnitude pruning from the same checkpoint (rewinding to it, the product's
behaviour with a trained model), at the same number of non-zero weights as the L1 model, trained
``lottery_rounds + 1`` times for the same epochs (3 rounds, the criterion's default, in the full run; 1 in
the quick one); ONNX Runtime runs it dense, so its measured speedup is about 1x.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from deploy_prune import criteria
from deploy_prune.errors import DeployPruneError
from deploy_prune.metrics import count_macs, count_nonzero, count_params
from deploy_prune.reproduce.common import (SHAPE, Context, baseline_cnn, figure, mean_std, pm, reestimate_bn,
                                           table)
from deploy_prune.spec import Target
from deploy_prune.surgery import PlanConfig, analyze, choose, plan_from_roots, prune_channels, uniform_counts
from deploy_prune.train import evaluate

NAME = "criteria"
TITLE = "Every criterion at equal measured speedup, same finetuning budget, mean ± std over seeds"
PAPER = {"source": "Blalock et al. 2020 (protocol); Li et al. 2017, He et al. 2019, Liu et al. 2017, Hu et al. "
                   "2016, Frankle & Carbin 2019 (each one's claim against magnitude/random)",
         "claims": {"l1": "smallest-L1 beats random filters (Li et al.)",
                    "slimming": "70% of VGG channels pruned at no loss on CIFAR-10 (Liu et al.)",
                    "fpgm": "FPGM-only 40% on ResNet-56: 93.49 vs PFEC 93.06 (He et al., pretrained)",
                    "apoz": "2.59x compression of VGG-16 CONV5-3/FC6 with higher top-1 (Hu et al.)",
                    "lottery": "tickets match dense accuracy far below structured sparsity (Frankle & Carbin)",
                    "random": "the control (Blalock et al.: random and magnitude baselines are strong)"}}
QUICK = {"target_speedup": 1.6, "fallback_ratio": 0.5, "epochs": 1, "bench_batch": 16, "bench_iters": 40,
         "round_to": 8, "lottery_rounds": 1, "slimming_sparsity_epochs": 1}
FULL = {"target_speedup": 2.0, "fallback_ratio": 0.5, "epochs": 2, "bench_batch": 16, "bench_iters": 100,
        "round_to": 8, "lottery_rounds": 3, "slimming_sparsity_epochs": 2}


@contextlib.contextmanager
def timing_lock() -> Iterator[None]:
    """Hold the file lock named by ``DEPLOY_PRUNE_BENCH_LOCK`` (if set) while timing, so that timings taken on a
    shared machine do not overlap other benchmarks."""
    path = os.environ.get("DEPLOY_PRUNE_BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _widths(ctx: Context, base: torch.nn.Module, s: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Kept channels per group (keyed by the group's first layer): from the measured target search, else from
    the fallback ratio."""
    from deploy_prune.target import Measure, search

    shape = (s["bench_batch"], *SHAPE[1:])
    graph = analyze(base, shape)
    crit = criteria.create("l1")
    crit.prepare(base, graph, criteria.ScoreContext(data=ctx.data, seed=0, progress=False))
    cfg = PlanConfig(ratio=0.0, round_to=s["round_to"], max_layer_ratio=0.9)
    try:
        with timing_lock():
            found = search(base, graph, crit, cfg, Target("speedup", s["target_speedup"]), shape,
                           Measure("cpu", iters=s["bench_iters"], progress=False), ctx.say)
        chosen = found.probes[found.chosen]
        return dict(found.counts), {"how": "target_speedup", "value": s["target_speedup"],
                                    "search_measured": round(chosen.measured, 3),
                                    "probes": [p.to_json() for p in found.probes]}
    except DeployPruneError as exc:  # unreachable on this machine: equal ratio instead
        ctx.say(f"criteria: target not reached ({exc}); using ratio {s['fallback_ratio']} for every criterion")
        cfg = PlanConfig(ratio=s["fallback_ratio"], round_to=s["round_to"], max_layer_ratio=0.9)
        counts = uniform_counts(graph, cfg)
        return {g.modules[0]: counts[g.id] for g in graph.groups}, {"how": "ratio", "value": s["fallback_ratio"],
                                                                    "reason": str(exc)}


def _structured(ctx: Context, base: torch.nn.Module, name: str, counts: dict[str, int], seed: int,
                s: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from deploy_prune.criteria.slimming import SlimmingOptions

    epochs = s["epochs"]
    model = copy.deepcopy(base)
    graph = analyze(model, SHAPE)
    crit = criteria.create(name, SlimmingOptions(sparsity_epochs=s["slimming_sparsity_epochs"])
                           if name == "slimming" else None)
    crit.prepare(model, graph, criteria.ScoreContext(data=ctx.data, seed=seed, progress=ctx.progress))
    by_id = {g.id: counts[g.modules[0]] for g in graph.groups if g.modules[0] in counts}
    prune_channels(model, graph, plan_from_roots(graph, choose(graph, crit, by_id)))
    acc0 = round(evaluate(model, ctx.data.val), 2)
    acc_bn = round(evaluate(reestimate_bn(copy.deepcopy(model), ctx.data.train), ctx.data.val), 2)
    ctx.trainer(epochs, seed).finetune(model, f"finetune {name}")
    return model, {"criterion": name, "seed": seed, "params": count_params(model), "nonzero": count_nonzero(model),
                   "macs": count_macs(model, SHAPE), "accuracy_pruned": acc0,
                   "accuracy_pruned_bn": acc_bn, "accuracy_finetuned": round(evaluate(model, ctx.data.val), 2)}


def _ticket(ctx: Context, base: torch.nn.Module, nonzero: int, seed: int, epochs: int, rounds: int
            ) -> tuple[torch.nn.Module, dict[str, Any]]:
    from deploy_prune.criteria.lottery import LotteryOptions
    from deploy_prune.train.lottery import find_ticket
    from deploy_prune.unstructured import weight_layers

    o = LotteryOptions(lottery_rounds=rounds)
    total = sum(m.weight.numel() for m in weight_layers(base).values())
    others = count_nonzero(base) - sum(int(torch.count_nonzero(m.weight)) for m in weight_layers(base).values())
    sparsity = min(0.99, max(0.01, 1 - (nonzero - others) / total))
    res = find_ticket(base, ctx.data, target_sparsity=sparsity, rounds=o.lottery_rounds, scope=o.lottery_scope,
                      epochs_per_round=epochs, lr=1e-3, optimizer="adam", seed=seed, progress=ctx.progress)
    return res.model, {"criterion": "lottery", "seed": seed, "params": count_params(res.model),
                       "nonzero": count_nonzero(res.model), "macs": count_macs(res.model, SHAPE),
                       "accuracy_pruned": None, "accuracy_pruned_bn": None, "accuracy_finetuned": round(evaluate(res.model, ctx.data.val), 2),
                       "weight_sparsity": round(sparsity, 4), "trainings": o.lottery_rounds + 1}


def _bench(models: dict[str, torch.nn.Module], s: dict[str, Any]) -> dict[str, Any]:
    from deploy_prune.bench import benchmark
    from deploy_prune.export import export_onnx

    shape = (s["bench_batch"], *SHAPE[1:])
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="deploy-prune-reproduce-") as tmp:
        paths = {}
        for name, m in models.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            export_onnx(m, paths[name], example)
        with timing_lock():
            res = benchmark(paths, shape, provider="cpu", iters=s["bench_iters"], progress=False)
    dense = res.stats["dense"].p50
    return {"provider": res.provider, "threads": res.threads, "input_shape": list(shape), "method": res.method,
            "p50_ms": {n: round(st.p50, 4) for n, st in res.stats.items()},
            "speedup": {n: round(dense / st.p50, 3) for n, st in res.stats.items()}}


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.settings(QUICK, FULL)
    base = baseline_cnn(ctx)
    base_acc = round(evaluate(base, ctx.data.val), 2)
    ctx.say("criteria: fixing the widths (latency target search)")
    counts, how = _widths(ctx, copy.deepcopy(base), s)
    per_seed: list[dict[str, Any]] = []
    bench_models: dict[str, torch.nn.Module] = {"dense": base}
    l1_nonzero: dict[int, int] = {}
    names = [n for n in criteria.names() if n != "lottery"] + (["lottery"] if "lottery" in criteria.names() else [])
    for name in names:
        for seed in ctx.seeds:
            ctx.say(f"criteria: {name}, seed {seed}")
            if name == "lottery":
                model, row = _ticket(ctx, base, l1_nonzero[seed], seed, s["epochs"], s["lottery_rounds"])
            else:
                model, row = _structured(ctx, base, name, counts, seed, s)
                if name == "l1":
                    l1_nonzero[seed] = row["nonzero"]
            per_seed.append(row)
            if seed == ctx.seeds[0]:
                bench_models[name] = model
    ctx.say("criteria: one interleaved benchmark of every criterion's model against dense")
    bench = _bench(bench_models, s)
    rows = []
    for name in names:
        sel = [r for r in per_seed if r["criterion"] == name]
        m_ft, s_ft = mean_std(r["accuracy_finetuned"] for r in sel)
        m_p, s_p = mean_std(r["accuracy_pruned"] for r in sel)
        m_b, s_b = mean_std(r["accuracy_pruned_bn"] for r in sel)
        rows.append({"criterion": name, "speedup_measured": bench["speedup"].get(name), "params": sel[0]["params"],
                     "nonzero": sel[0]["nonzero"], "macs": sel[0]["macs"], "accuracy_pruned": m_p,
                     "accuracy_pruned_std": s_p, "accuracy_pruned_bn": m_b, "accuracy_pruned_bn_std": s_b,
                     "accuracy_finetuned": m_ft, "accuracy_finetuned_std": s_ft,
                     "seeds": len(sel), "paper": PAPER["claims"].get(name)})
    by = {r["criterion"]: r for r in rows}
    beats = [n for n in by if n not in ("random", "lottery") and by[n]["accuracy_finetuned"] is not None
             and by["random"]["accuracy_finetuned"] is not None
             and by[n]["accuracy_finetuned"] >= by["random"]["accuracy_finetuned"]]
    structured = [n for n in by if n not in ("random", "lottery")]
    return {"paper": PAPER, "settings": {**s, "model": "builtin:mnist_cnn (shipped weights)", "seeds": ctx.seeds,
                                         "baseline_accuracy": base_acc, "widths_from": how, "kept_channels": counts},
            "benchmark": bench, "rows": rows, "per_seed": per_seed,
            "finding": {"claim": "every data-driven criterion >= the random control after the same finetuning",
                        "holds": len(beats) == len(structured),
                        "measured": f"{len(beats)} of {len(structured)} ({', '.join(beats) or 'none'}) at or above "
                                    f"random ({by['random']['accuracy_finetuned']:.2f}%); widths from "
                                    f"{how['how']} {how['value']}"}}


def plot(result: dict[str, Any], path: Path) -> None:
    fig, ax = figure(7.0, 4.0)
    rows = result["rows"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["accuracy_pruned_bn"] or 0 for r in rows], width=0.4,
           yerr=[r["accuracy_pruned_bn_std"] or 0 for r in rows], capsize=3,
           label="right after pruning (BN statistics re-estimated)")
    ax.bar([x + 0.2 for x in xs], [r["accuracy_finetuned"] or 0 for r in rows], width=0.4,
           yerr=[r["accuracy_finetuned_std"] or 0 for r in rows], capsize=3, label="after finetuning")
    ax.axhline(result["settings"]["baseline_accuracy"], color="gray", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['criterion']}\n{r['speedup_measured'] or 0:.2f}x" for r in rows], fontsize=8)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Criteria at equal widths (measured speedup under each name)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def markdown(result: dict[str, Any]) -> list[str]:
    how = result["settings"]["widths_from"]
    b = result["benchmark"]
    head = [f"Baseline {result['settings']['baseline_accuracy']:.2f}%. Widths from "
            + (f"the target search for {how['value']}x (the chosen probe measured {how['search_measured']}x)"
               if how["how"] == "target_speedup" else f"ratio {how['value']} ({how.get('reason', '')})")
            + f"; speedups measured in one interleaved ONNX Runtime run ({b['provider']}, {b['threads']} threads, "
              f"input {'x'.join(map(str, b['input_shape']))}).", ""]
    return head + table(["criterion", "measured speedup", "params", "non-zero", "pruned", "pruned + BN re-estimated",
                         "finetuned", "paper"],
                        [[r["criterion"], r["speedup_measured"], r["params"], r["nonzero"],
                          pm(r["accuracy_pruned"], r["accuracy_pruned_std"]),
                          pm(r["accuracy_pruned_bn"], r["accuracy_pruned_bn_std"]),
                          pm(r["accuracy_finetuned"], r["accuracy_finetuned_std"]), r["paper"]]
                         for r in result["rows"]])
