"""How much more MACs than uniform pruning the latency tables *believe* an allocation can keep at a given speed.

No model is timed as a whole here: everything is the latency tables' prediction (the product's one-layer ONNX
Runtime timings, from the cache or measured once). For each model, at predicted speedups 1.5x to 3.5x:

* the MACs kept by each allocation's trajectory (``latency``, ``uniform``, ``importance``; the product's
  :func:`deploy_prune.target.allocation_states`), interpolated at that speedup, as a fraction of dense;
* a hill-climb on the tables from the richest trajectory point within the predicted latency budget: add one
  channel step to a group, paying for it by removing one step from another group where needed, while the
  predicted latency stays within budget and the MACs grow; an estimate of what the best allocation the tables
  allow keeps (not a proof of optimality).

If the tables see no allocation keeping much more than uniform pruning at a speed, no allocation steered by them
will; if they see one and whole-model measurement does not confirm it, the tables mislead. Example::

    python benchmarks/table_frontier.py --models resnet18,resnet50 --step 32

docs/latency-target.md records what it printed and what whole-model timings said.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from table_grid import prepared  # noqa: E402

from deploy_prune import bench, latency  # noqa: E402
from deploy_prune.surgery import comparable_scores  # noqa: E402
from deploy_prune.target import ALLOCATIONS, allocation_states, allowed_counts, fractions  # noqa: E402

SPEEDS = (1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5)


def at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The MACs fraction of a (predicted speedup, MACs fraction) curve at speedup ``x``, linearly interpolated."""
    for (s0, m0), (s1, m1) in zip(curve, curve[1:]):
        if s0 <= x <= s1 and s1 > s0:
            return m0 + (m1 - m0) * (x - s0) / (s1 - s0)
    return None


def climb(lat: latency.LatencyModel, graph: Any, allowed: dict[int, list[int]], counts: dict[int, int],
          budget: float) -> dict[int, int]:
    """Best-improvement hill-climb on the tables' MACs within the predicted latency ``budget`` (see above)."""
    def frac(c: dict[int, int]) -> dict[int, float]:
        return fractions(graph, c)

    c = dict(counts)
    while True:
        current = lat.macs(frac(c))
        best: tuple[float, dict[int, int]] | None = None
        for j in c:
            k = allowed[j].index(c[j])
            if k + 1 >= len(allowed[j]):
                continue
            up = {**c, j: allowed[j][k + 1]}
            tries = [up] if lat.predict(frac(up)) <= budget else [
                {**up, i: allowed[i][allowed[i].index(c[i]) - 1]} for i in c
                if i != j and allowed[i].index(c[i]) > 0]
            for cand in tries:
                m = lat.macs(frac(cand))
                if m > current * (1 + 1e-6) and lat.predict(frac(cand)) <= budget and (best is None or m > best[0]):
                    best = (m, cand)
        if best is None:
            return c
        c = best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0,regnet_x_400mf,convnext_tiny")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--step", type=int, default=32, help="the channel step (the AVX2 VM's auto choice: 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--climb", default="1.5,2,3", help="predicted speedups to hill-climb at ('' = none)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    print(f"step {args.step}, {args.input_shape}, CPU provider, {args.threads} threads; {bench.cpu_name()}, "
          f"ONNX Runtime {bench.ort.__version__}. MACs kept (fraction of dense, as the tables' sites count them) "
          "at the tables' predicted speedup")
    for name in args.models.split(","):
        model, graph, crit, cfg, measure = prepared(name, shape, args.step, args.threads)
        lat = latency.build(graph, shape[0], measure.timer(), measure.cache(), args.step)
        scores = comparable_scores(graph, crit)
        dense_ms, dense_macs = lat.predict({}), lat.macs({})
        states = {a: allocation_states(a, graph, scores, lat, cfg) for a in ALLOCATIONS}
        curves = {a: [(dense_ms / s.predicted_ms, lat.macs(fractions(graph, s.counts)) / dense_macs) for s in st]
                  for a, st in states.items()}
        print(f"\n{name}\n| predicted speedup | " + " | ".join(ALLOCATIONS) + " | latency / uniform |")
        print("|---:|" + "---:|" * (len(ALLOCATIONS) + 1))
        for x in SPEEDS:
            vals = {a: at(c, x) for a, c in curves.items()}
            ratio = vals["latency"] / vals["uniform"] if vals["latency"] and vals["uniform"] else None
            cells = " | ".join("-" if v is None else f"{v:.3f}" for v in vals.values())
            print(f"| {x:g}x | {cells} | {'-' if ratio is None else f'{ratio:.3f}'} |")
        allowed = {g.id: allowed_counts(g, cfg) for g in graph.groups}
        for x in (float(v) for v in args.climb.split(",") if v):
            budget = dense_ms / x
            start = max((s for st in states.values() for s in st if s.predicted_ms <= budget),
                        key=lambda s: lat.macs(fractions(graph, s.counts)))
            best = climb(lat, graph, allowed, start.counts, budget)
            uni = at(curves["uniform"], x)
            kept = lat.macs(fractions(graph, best)) / dense_macs
            print(f"hill-climb at {x:g}x: {kept:.3f} of dense MACs"
                  + (f", {kept / uni:.3f}x uniform's" if uni else "")
                  + f"; widths {[best[g.id] for g in graph.groups]}")


if __name__ == "__main__":
    main()
