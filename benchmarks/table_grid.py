"""How well the latency tables predict whole-model speedups, with two grids of timed widths.

The latency tables time every conv and linear layer alone at a few fractions of its widths and interpolate
between them (``deploy_prune.latency``). This builds the tables of each model with the grid of fractions
before 2026-12-04 night (0.25, 0.5, 1) and with the grid now (0.1, 0.25, 0.5, 1; 0.1 is the planner's default
floor), takes points of the ``latency`` and ``uniform`` trajectories near predicted speedups 1.5, 2 and 3,
exports them, times them all with the dense model in one interleaved run of the product's benchmark (twice),
and prints per point the measured speedup against each grid's prediction. The search calibrates its
predictions on the probes it measures, so the number that matters is the spread of measured / predicted
across one model's points (the std of its log), which no calibration removes::

    python benchmarks/table_grid.py --models resnet18,regnet_x_400mf

docs/latency-target-log.md records what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from deploy_prune import bench, criteria, latency
from deploy_prune.export import export_onnx
from deploy_prune.loading import build_arch
from deploy_prune.metrics import count_macs
from deploy_prune.surgery import PlanConfig, analyze, choose, comparable_scores, plan_from_roots
from deploy_prune.surgery.apply import prune_channels
from deploy_prune.target import Measure, allocation_states

OLD = (0.25, 0.5, 1.0)
NEW = latency._GRID_FRACTIONS
GOALS = (1.5, 2.0, 3.0)


def prepared(name: str, shape: tuple[int, ...], step: int, threads: int) -> tuple[Any, ...]:
    """A torchvision model as the product sees it: (model, graph, L1 criterion, search config, measure)."""
    model, _ = build_arch(f"torchvision:{name}")
    model.eval()
    graph = analyze(model, shape)
    crit = criteria.create("l1")
    crit.prepare(model, graph, criteria.ScoreContext())
    return model, graph, crit, PlanConfig(ratio=0.0, round_to=step), Measure("cpu", threads)


def export_counts(model: Any, graph: Any, crit: Any, counts: dict[int, int], path: Path, example: torch.Tensor,
                  shape: tuple[int, ...]) -> int:
    """Prune a copy of ``model`` to ``counts`` kept classes per group, as a probe of the search is, export it to
    ``path``; returns its MACs."""
    pruned = copy.deepcopy(model)
    prune_channels(pruned, graph, plan_from_roots(graph, choose(graph, crit, counts)))
    export_onnx(pruned, path, example)
    return count_macs(pruned, shape)


def one(name: str, shape: tuple[int, ...], step: int, threads: int, repeats: int) -> list[dict]:
    model, graph, crit, cfg, measure = prepared(name, shape, step, threads)
    tables = {g: latency.build(graph, shape[0], measure.timer(), measure.cache(), step, fractions=f)
              for g, f in (("old", OLD), ("new", NEW))}
    full = {g.id: 1.0 for g in graph.groups}
    dense = {g: t.predict(full) for g, t in tables.items()}
    scores = comparable_scores(graph, crit)
    points = []
    for alloc in ("latency", "uniform"):
        states = allocation_states(alloc, graph, scores, tables["new"], cfg)
        for goal in GOALS:
            s = min(states, key=lambda s: abs(math.log(dense["new"] / s.predicted_ms / goal)))
            if any(p["counts"] == s.counts for p in points):
                continue
            frac = {g.id: s.counts[g.id] / g.size for g in graph.groups}
            points.append({"allocation": alloc, "goal": goal, "counts": s.counts,
                           **{f"pred_{g}": dense[g] / t.predict(frac) for g, t in tables.items()}})
    tmp = Path(tempfile.mkdtemp(prefix="table-grid-"))
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    paths = {"dense": tmp / "dense.onnx"}
    export_onnx(model, paths["dense"], example)
    for i, p in enumerate(points):
        paths[f"p{i}"] = tmp / f"p{i}.onnx"
        p["macs"] = export_counts(model, graph, crit, p["counts"], paths[f"p{i}"], example, shape)
    for _ in range(repeats):
        res = bench.benchmark(paths, shape, provider="cpu", threads=threads, iters=40, progress=False,
                              min_seconds=3.0)
        d = res.stats["dense"].p50
        for i, p in enumerate(points):
            p.setdefault("measured", []).append(d / res.stats[f"p{i}"].p50)
    for p in points:
        del p["counts"]
        p["measured_median"] = statistics.median(p["measured"])
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0,regnet_x_400mf,convnext_tiny")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--step", type=int, default=16, help="the channel step (what --round-to auto chose: 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    out = {}
    print("model | allocation | goal | MACs | measured (each run) | old grid: predicted, measured/predicted | "
          "new grid: predicted, measured/predicted")
    for name in args.models.split(","):
        pts = out[name] = one(name, shape, args.step, args.threads, args.repeats)
        for p in pts:
            m = p["measured_median"]
            print(f"{name} | {p['allocation']} | {p['goal']} | {p['macs'] / 1e6:.0f}M | "
                  f"{', '.join(f'{v:.3f}' for v in p['measured'])} | {p['pred_old']:.3f}, {m / p['pred_old']:.3f} | "
                  f"{p['pred_new']:.3f}, {m / p['pred_new']:.3f}")
        for g in ("old", "new"):
            logs = [math.log(p["measured_median"] / p[f"pred_{g}"]) for p in pts]
            print(f"{name} {g} grid: std of log(measured/predicted) over {len(pts)} points "
                  f"{statistics.pstdev(logs):.3f}, worst |log| {max(abs(v) for v in logs):.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
