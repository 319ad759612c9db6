"""Does the latency harness tell the truth? Three checks, measured side by side in one process.

1. A/A: the same ONNX file twice under two names. Any ratio away from 1.00x is the harness's own bias.
2. deploy-prune's harness (blocks, spinning off) against each model timed alone in its own session, one at a
   time: the speedups should agree.
3. The naive harness: default ORT sessions (spinning on) alternated call by call. docs/onnx-runtime.md §7 measured
   this distorting the speedup by up to a third on a 2-core machine.

    python benchmarks/harness_check.py [--model resnet18] [--shape 1x3x224x224] [--iters 100]

Prints a Markdown table; docs/benchmarking.md records a run.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

from deploy_prune.bench import benchmark, default_threads
from deploy_prune.criteria import ScoreContext, create
from deploy_prune.export import export_onnx
from deploy_prune.spec import parse_shape
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select


def _naive(paths: dict[str, Path], shape: tuple[int, ...], iters: int, threads: int) -> dict[str, float]:
    """Default sessions (spinning on), alternated call by call: what a quick script would do."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(iters):
        for k, s in sessions.items():
            t0 = time.perf_counter_ns()
            s.run(None, {s.get_inputs()[0].name: x})
            times[k].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--shape", default="1x3x224x224")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    shape = parse_shape(args.shape)
    threads = default_threads()
    torch.manual_seed(0)
    dense = torchvision.models.get_model(args.model).eval()
    pruned = copy.deepcopy(dense)
    graph = analyze(pruned, shape)
    crit = create("l1")
    crit.prepare(pruned, graph, ScoreContext())
    prune_channels(pruned, graph, select(graph, crit, PlanConfig(ratio=args.ratio, round_to=8)))
    tmp = Path(tempfile.mkdtemp())
    try:
        paths = {"dense": tmp / "dense.onnx", "pruned": tmp / "pruned.onnx"}
        export_onnx(dense, paths["dense"], torch.randn(*shape))
        export_onnx(pruned, paths["pruned"], torch.randn(*shape))
        shutil.copy(paths["dense"], tmp / "dense_copy.onnx")
        rows = []
        aa = benchmark({"dense": paths["dense"], "dense_copy": tmp / "dense_copy.onnx", "pruned": paths["pruned"]},
                       shape, threads=threads, iters=args.iters, progress=False)
        rows.append(("deploy-prune harness (blocks, spinning off), 3 sessions",
                     aa.stats["dense"].p50, aa.stats["dense_copy"].p50, aa.stats["pruned"].p50))
        alone = {k: benchmark({k: p}, shape, threads=threads, iters=args.iters, progress=False).stats[k].p50
                 for k, p in paths.items()}
        rows.append(("each model alone, one session at a time", alone["dense"], float("nan"), alone["pruned"]))
        naive = _naive({"dense": paths["dense"], "dense_copy": tmp / "dense_copy.onnx", "pruned": paths["pruned"]},
                       shape, args.iters, threads)
        rows.append(("naive: default sessions (spinning on), alternated per call", naive["dense"], naive["dense_copy"],
                     naive["pruned"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.model} {args.shape}, L1 {args.ratio}, ORT {ort.__version__} CPU, {threads} threads, "
          f"{args.iters} runs per variant; median ms\n")
    print("| harness | dense | same file again | pruned | A/A ratio | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, d, dc, p in rows:
        aa_ratio = "—" if dc != dc else f"{d / dc:.3f}x"
        dc_s = "—" if dc != dc else f"{dc:.2f}"
        print(f"| {name} | {d:.2f} | {dc_s} | {p:.2f} | {aa_ratio} | {d / p:.2f}x |")


if __name__ == "__main__":
    main()
