"""Would the tables steer better if each layer's time were corrected by what it costs inside the whole model?

A table times each conv alone, and on the CPU provider a one-layer model pays a layout conversion on each side
(``ReorderInput`` to ONNX Runtime's blocked NCHWc layout and ``ReorderOutput`` back), which the whole model does
only at its ends, and it runs without the neighbours that share the caches. This experiment (not part of the
product) profiles the dense model once with ONNX Runtime's profiler, finds each conv/linear layer's kernel
among its nodes (by its input, weight and output shapes, in execution order), profiles each one-layer model at
its dense widths too, and scales each layer's table by

    (the conv kernel inside the model + one-layer activation) / (one-layer reorders + conv kernel + activation)

where each time is the profiler's: a layer keeps its activation's cost (which the tables time on purpose)
and trades its one-layer conversions and kernel for the kernel it runs in the model. Then, as ``group_correction.py`` does, points of
the tables' trajectory, of the corrected one and of Torch-Pruning's uniform L1 are timed with the dense model
in one interleaved run::

    python benchmarks/context_scale.py --model regnet_x_400mf --tp-ratios 0.787,0.844,0.886

docs/latency-target-log.md records what it measured.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from deploy_prune import latency
from deploy_prune.export import export_onnx
from deploy_prune.surgery import comparable_scores
from deploy_prune.target import trajectory

sys.path.insert(0, str(Path(__file__).parent))
import group_correction as G  # noqa: E402
from table_timing import profiled  # noqa: E402

KERNELS = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"}


def site_signature(s: latency.Site) -> tuple[Any, ...]:
    if s.op == "conv":
        h, w = s.in_shape[2], s.in_shape[3]
        ho = (h + 2 * s.padding[0] - s.dilation[0] * (s.kernel[0] - 1) - 1) // s.stride[0] + 1
        wo = (w + 2 * s.padding[1] - s.dilation[1] * (s.kernel[1] - 1) - 1) // s.stride[1] + 1
        return ("conv", s.in_channels, h, w, s.out_channels, s.in_channels // s.groups, *s.kernel, ho, wo)
    return ("linear", s.in_channels, s.out_channels)


def node_signature(n: dict[str, Any]) -> tuple[Any, ...] | None:
    if n["op"] not in KERNELS or not n["inputs"] or not n["outputs"]:
        return None
    x, y = n["inputs"][0], n["outputs"][0]
    if n["op"] in ("Conv", "FusedConv"):
        w = n["inputs"][1] if len(n["inputs"]) > 1 else []
        if len(x) == 4 and len(w) == 4 and len(y) == 4:
            return ("conv", x[1], x[2], x[3], w[0], w[1], w[2], w[3], y[2], y[3])
        return None
    return ("linear", x[-1], y[-1])  # Gemm / MatMul: the profiler lists constant weights only sometimes


def context_scales(lat: latency.LatencyModel, dense: Path, shape: tuple[int, ...], threads: int,
                   runs: int = 60) -> tuple[dict[int, float], dict[str, Any]]:
    """Per site index: the factor on its table (see the module docstring); sites not found in the profile keep 1."""
    whole = profiled(dense, shape, threads, runs, warmup=5)
    in_model: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for n in whole:
        sig = node_signature(n)
        if sig is not None:
            in_model[sig].append(n["ms"])
    by_sig: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, s in enumerate(lat.sites):
        by_sig[site_signature(s)] += [i] * s.calls
    scale: dict[int, float] = {}
    unmatched = []
    alone_parts: dict[str, list[dict[str, Any]]] = {}
    for sig, idx in by_sig.items():
        found = in_model.get(sig, [])
        if len(found) != len(idx):
            unmatched.append({"signature": list(sig), "sites": len(idx), "nodes": len(found)})
            continue
        per: dict[int, list[float]] = defaultdict(list)
        for i, ms in zip(idx, found):
            per[i].append(ms)
        for i, ctx in per.items():
            s = lat.sites[i]
            if s.config() not in alone_parts:  # identical blocks share one profile
                alone_parts[s.config()] = profiled(latency.layer_model(s, s.in_channels, s.out_channels),
                                                   latency._in_shape(s, s.in_channels), threads, 15)
            parts = alone_parts[s.config()]
            reorders = sum(p["ms"] for p in parts if p["op"].startswith("Reorder"))
            kernel = sum(p["ms"] for p in parts if p["op"] in KERNELS)
            act = sum(p["ms"] for p in parts) - reorders - kernel
            alone = reorders + kernel + act
            scale[i] = min(4.0, max(0.25, (statistics.fmean(ctx) + act) / alone)) if alone > 0 else 1.0
    whole_ms = sum(n["ms"] for n in whole)
    kernels_ms = sum(n["ms"] for n in whole if node_signature(n) is not None)
    return scale, {"unmatched": unmatched, "whole_kernels_ms": round(whole_ms, 4),
                   "conv_linear_kernels_ms": round(kernels_ms, 4)}


class SiteScaled(latency.LatencyModel):
    """The tables, each site's time multiplied by its factor."""

    site_scale: dict[int, float]

    def site_ms(self, i, frac):  # type: ignore[override]
        return super().site_ms(i, frac) * self.site_scale.get(i, 1.0)


def main() -> None:
    ap = G.point_args(__doc__, "0.787,0.844,0.886")
    ap.add_argument("--scales-only", action="store_true", help="print the factors per stage and stop")
    args = ap.parse_args()
    shape, model, graph, crit, cfg, measure, lat, tmp, example = G.setup(args, "context-scale-")
    export_onnx(model, tmp / "dense.onnx", example)
    scale, info = context_scales(lat, tmp / "dense.onnx", shape, args.threads)
    corrected = SiteScaled(lat.sites, lat.tables, lat.step)
    corrected.site_scale = scale
    full = {g.id: 1.0 for g in graph.groups}
    print(f"dense: tables {lat.predict(full):.3f} ms, corrected {corrected.predict(full):.3f} ms; "
          f"profile: {json.dumps(info)}")
    print("site | widths | table ms | factor")
    for i, s in enumerate(lat.sites):
        print(f"{s.name} | {s.in_channels}->{s.out_channels} | {lat.site_ms(i, full):.4f} | {scale.get(i, math.nan):.2f}")
    if args.scales_only:
        return
    scores = comparable_scores(graph, crit)
    trajectories = {"tables": trajectory(graph, scores, lat, cfg),
                    "context": trajectory(graph, scores, corrected, cfg)}
    rows = G.time_points(model, graph, crit, lat, trajectories, shape, args, tmp, example)
    if args.json:
        args.json.write_text(json.dumps({"scale": scale, "info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
