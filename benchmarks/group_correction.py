"""Would a whole-model measurement per channel group steer the latency-aware trajectory better?

The latency tables time each layer alone, and the ``latency`` trajectory spends the speed-up where they
predict the most milliseconds saved per MAC. This experiment (not part of the product) measures, for every
channel group, the whole model with only that group at the planner's floor against dense (NetAdapt's
empirical per-layer measurement, Yang et al. 2018, on the whole ONNX model), scales the tables' predicted
saving of each group by measured / predicted, and builds the trajectory again. Then points of both
trajectories and Torch-Pruning's uniform L1 at a few ratios are timed with the dense model in one interleaved
run: MACs kept against measured speedup, side by side::

    python benchmarks/group_correction.py --model regnet_x_400mf --tp-ratios 0.8,0.844,0.886

docs/latency-target-log.md records what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from deploy_prune import bench, latency
from deploy_prune.export import export_onnx
from deploy_prune.metrics import count_macs
from deploy_prune.surgery import comparable_scores
from deploy_prune.target import allowed_counts, trajectory

sys.path.insert(0, str(Path(__file__).parent))
import compare_torch_pruning as C  # noqa: E402
import table_grid as T  # noqa: E402


def site_macs(lat: latency.LatencyModel, graph, counts: dict[int, int]) -> float:
    """The MACs of the conv and linear layers at these kept counts (what count_macs gives, without pruning)."""
    frac = {g.id: counts[g.id] / g.size for g in graph.groups}
    total = 0.0
    for s in lat.sites:
        (cin, cout), (cin0, cout0) = s.widths(frac), s.widths({})
        total += s.macs() * cin / cin0 * (1.0 if s.depthwise else cout / cout0)
    return total


class Scaled(latency.LatencyModel):
    """The tables, each group's predicted saving scaled by its measured / predicted factor."""

    scale: dict[int, float]

    def delta(self, frac, group, new):  # type: ignore[override]
        return super().delta(frac, group, new) * self.scale.get(group, 1.0)


def measure_scales(graph, cfg, lat, old, shape, threads, export, tmp):
    """Every group alone at its floor, against dense, in one interleaved run (twice): measured / predicted
    saving per group (``old``: the tables with the grid before 2026-12-04 night, printed alongside)."""
    full = {g.id: 1.0 for g in graph.groups}
    dense_pred = lat.predict(full)
    paths = {"dense": tmp / "dense.onnx"}
    floors, predicted, predicted_old = {}, {}, {}
    for g in graph.groups:
        low = allowed_counts(g, cfg)[0]
        if low < g.size:
            floors[g.id] = low
            predicted[g.id] = lat.delta(full, g.id, low / g.size)
            predicted_old[g.id] = old.delta(full, g.id, low / g.size)
            paths[f"g{g.id}"] = export({**{h.id: h.size for h in graph.groups}, g.id: low}, f"g{g.id}")[0]
    saved: dict[int, list[float]] = {gid: [] for gid in floors}
    dense_ms = []
    for _ in range(2):
        res = bench.benchmark(paths, shape, provider="cpu", threads=threads, iters=30, progress=False,
                              min_seconds=2.0)
        d = res.stats["dense"].p50
        dense_ms.append(d)
        for gid in floors:
            saved[gid].append(1.0 - res.stats[f"g{gid}"].p50 / d)  # a fraction: the VM's speed drifts
    scale = {}
    noise = 0.01 * statistics.median(dense_ms)
    print(f"dense: predicted {dense_pred:.3f} ms, measured {', '.join(f'{d:.3f}' for d in dense_ms)} ms")
    print("group | size -> floor | predicted saving ms, old grid | predicted saving ms | "
          "measured saving, of dense (each run), ms | scale")
    for g in graph.groups:
        if g.id not in floors:
            continue
        m = statistics.median(saved[g.id]) * statistics.median(dense_ms)
        p = predicted[g.id]
        scale[g.id] = 1.0 if max(m, p) < noise else min(4.0, max(0.25, max(m, 0.0) / max(p, 1e-6)))
        print(f"{g.id} | {g.size} -> {floors[g.id]} | {predicted_old[g.id]:.3f} | {p:.3f} | "
              f"{', '.join(f'{v:.1%}' for v in saved[g.id])}, {m:.3f} | {scale[g.id]:.2f}")
    return scale, dense_ms


def exporter(model, graph, crit, tmp: Path, example: torch.Tensor, shape: tuple[int, ...]
             ) -> Callable[[dict[int, int], str], tuple[Path, int]]:
    """``export(counts, name)``: ``model`` pruned to ``counts`` kept classes per group, exported to
    ``tmp/name.onnx``; returns the path and its MACs."""

    def export(counts: dict[int, int], name: str) -> tuple[Path, int]:
        path = tmp / f"{name}.onnx"
        return path, T.export_counts(model, graph, crit, counts, path, example, shape)

    return export


def time_points(model, graph, crit, lat, trajectories: dict, shape: tuple[int, ...], args, tmp: Path,
                example: torch.Tensor) -> list[dict]:
    """Points of each trajectory in the ``args.macs`` range (``args.points`` each) and Torch-Pruning's uniform L1
    at ``args.tp_ratios``, timed with the dense model (``tmp/dense.onnx``) in one interleaved run, three times;
    prints and returns MACs against measured speedup per point."""
    export = exporter(model, graph, crit, tmp, example, shape)
    # each trajectory's own predicted speedup is compressed differently: the points span the same MACs range
    paths = {"dense": tmp / "dense.onnx"}
    macs: dict[str, int] = {}
    for name, states in trajectories.items():
        lo, hi = (float(v) * 1e6 for v in args.macs.split(","))
        cand = [i for i, s in enumerate(states) if lo <= site_macs(lat, graph, s.counts) <= hi]
        pick = sorted({cand[round(k * (len(cand) - 1) / max(1, args.points - 1))]
                       for k in range(args.points)}) if cand else []
        for i in pick:
            key = f"{name}-{i}"
            paths[key], macs[key] = export(states[i].counts, key)
    for r in (float(v) for v in args.tp_ratios.split(",") if v):
        t = copy.deepcopy(model)
        C.prune_tp(t, shape, r, args.step)
        key = f"tp-{r}"
        paths[key] = tmp / f"{key}.onnx"
        export_onnx(t, paths[key], example)
        macs[key] = count_macs(t, shape)
    speed: dict[str, list[float]] = {k: [] for k in macs}
    for _ in range(3):
        res = bench.benchmark(paths, shape, provider="cpu", threads=args.threads, iters=40, progress=False,
                              min_seconds=3.0)
        d = res.stats["dense"].p50
        for k in macs:
            speed[k].append(d / res.stats[k].p50)
    print("point | MACs | measured speedup (each run) | median")
    rows = []
    for k in sorted(macs, key=lambda k: statistics.median(speed[k])):
        med = statistics.median(speed[k])
        rows.append({"point": k, "macs": macs[k], "speedups": speed[k], "median": med})
        print(f"{k} | {macs[k] / 1e6:.1f}M | {', '.join(f'{v:.3f}' for v in speed[k])} | {med:.3f}")
    return rows


def point_args(doc: str, tp_ratios: str) -> argparse.ArgumentParser:
    """The arguments of a script that compares trajectories with :func:`time_points`."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default="regnet_x_400mf")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--step", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--macs", default="130,200", help="the MACs range (millions) of the trajectory points compared")
    ap.add_argument("--points", type=int, default=6, help="points per trajectory")
    ap.add_argument("--tp-ratios", default=tp_ratios)
    ap.add_argument("--json", type=Path)
    return ap


def setup(args: argparse.Namespace, prefix: str) -> tuple[Any, ...]:
    """The model of ``args`` as the product sees it, its latency tables, a scratch folder and the example input:
    (shape, model, graph, criterion, config, measure, tables, folder, example)."""
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    model, graph, crit, cfg, measure = T.prepared(args.model, shape, args.step, args.threads)
    lat = latency.build(graph, shape[0], measure.timer(), measure.cache(), args.step)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return shape, model, graph, crit, cfg, measure, lat, tmp, example


def main() -> None:
    ap = point_args(__doc__, "0.8,0.844,0.886")
    ap.add_argument("--scales-from", type=Path, help="reuse the per-group scales of an earlier --json")
    args = ap.parse_args()
    shape, model, graph, crit, cfg, measure, lat, tmp, example = setup(args, "group-correction-")
    export = exporter(model, graph, crit, tmp, example, shape)

    export_onnx(model, tmp / "dense.onnx", example)
    if args.scales_from:
        scale = {int(k): v for k, v in json.loads(args.scales_from.read_text())["scale"].items()}
        dense_ms: list[float] = []
    else:
        old = latency.build(graph, shape[0], measure.timer(), measure.cache(), args.step,
                            fractions=T.OLD)
        scale, dense_ms = measure_scales(graph, cfg, lat, old, shape, args.threads, export, tmp)
    corrected = Scaled(lat.sites, lat.tables, lat.step)
    corrected.scale = scale
    scores = comparable_scores(graph, crit)
    trajectories = {"tables": trajectory(graph, scores, lat, cfg),
                    "corrected": trajectory(graph, scores, corrected, cfg)}

    rows = time_points(model, graph, crit, lat, trajectories, shape, args, tmp, example)
    if args.json:
        args.json.write_text(json.dumps({"scale": scale, "rows": rows, "dense_ms": dense_ms}, indent=1))


if __name__ == "__main__":
    main()
