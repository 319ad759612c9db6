"""How well the latency tables' sum of one-layer timings predicts a pruned model's measured speedup, with the
product's one-layer timing and with an alternative: each layer's kernels alone, as ONNX Runtime's profiler
records them, without the NCHWc layout reorders that a one-layer model pays at its input and output on the CPU
provider (a whole model pays them once).

For each model, ``deploy-prune run MODEL --ratio R --no-finetune`` makes a bundle exactly as a user would; then
every conv/linear site of the dense model is timed at its dense widths and at the bundle's widths, both ways,
and the bundle's dense.onnx and model.onnx are timed side by side in the product's interleaved benchmark::

    python benchmarks/table_timing.py --models resnet18,mobilenet_v2 --work /tmp/tt

It prints, per model, the measured speedup and each method's predicted speedup (sum of dense site times / sum of
pruned site times) with its error. docs/latency-target-log.md records what it measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from deploy_prune import bench, latency
from deploy_prune.bench import make_runner, make_session
from deploy_prune.loading import build_arch, load_model
from deploy_prune.surgery import analyze


def profiled(model: bytes | Path, shape: tuple[int, ...], threads: int | None, runs: int, warmup: int = 3
             ) -> list[dict[str, Any]]:
    """Every node ONNX Runtime ran on the CPU provider, in execution order: op, input and output shapes, and the
    25th percentile of its profiled kernel time (ms) over ``runs`` runs with the benchmark's session options."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:  # the benchmark's session options, with the profiler on
        session = make_session(model, "cpu", threads, profile_prefix=str(Path(tmp) / "p"))
        run = make_runner(session, np.random.default_rng(0).standard_normal(shape, dtype=np.float32), "cpu")
        for _ in range(warmup + runs):
            run()
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            a = e["args"]
            node = nodes.setdefault(e["name"], {
                "op": a.get("op_name"),
                "inputs": [next(iter(v.values())) for v in a.get("input_type_shape", [])],
                "outputs": [next(iter(v.values())) for v in a.get("output_type_shape", [])],
                "ms": []})
            node["ms"].append(e["dur"] / 1000)
    for node in nodes.values():
        node["ms"] = float(np.percentile(node["ms"][-runs:], 25))
    return list(nodes.values())


def kernels_ms(timer: latency.Timer, model: bytes, shape: tuple[int, ...]) -> float:
    """The alternative: per node, the 25th percentile of its profiled kernel times, summed over every node but
    the layout reorders (``ReorderInput`` / ``ReorderOutput``)."""
    return sum(n["ms"] for n in profiled(model, shape, timer.threads, timer.repeats)
               if not n["op"].startswith("Reorder"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0,regnet_x_400mf,convnext_tiny")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the bundles here (default: a temp folder)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="table-timing-"))
    timer = latency.Timer("CPUExecutionProvider", args.threads)
    print(f"ratio {args.ratio}, {args.input_shape}, CPU provider, {args.threads} threads; "
          f"{bench.cpu_name()}, ONNX Runtime {bench.ort.__version__}")
    print(f"{'model':18s} {'measured':>9s} {'wall (product)':>15s} {'err':>6s} {'kernels':>8s} {'err':>6s}")
    for name in args.models.split(","):
        out = work / name
        subprocess.run([sys.executable, "-m", "deploy_prune", "run", f"torchvision:{name}", "--ratio",
                        str(args.ratio), "--no-finetune", "--input-shape", args.input_shape, "--threads",
                        str(args.threads), "--out", str(out), "--force"], check=True, capture_output=True)
        dense, _ = build_arch(f"torchvision:{name}")
        pruned = dict(load_model(str(out / "pruned.pt")).model.named_modules())
        wall = {"dense": 0.0, "pruned": 0.0}
        kern = {"dense": 0.0, "pruned": 0.0}
        for s in latency.sites(analyze(dense.eval(), shape), shape[0]):
            mod = pruned[s.name]
            widths = {"dense": (s.in_channels, s.out_channels),
                      "pruned": (mod.in_channels, mod.out_channels) if s.op == "conv"
                      else (mod.in_features, mod.out_features)}
            for k, (cin, cout) in widths.items():
                wall[k] += timer.site(s, cin, cout) * s.calls
                kern[k] += kernels_ms(timer, latency.layer_model(s, cin, cout), latency._in_shape(s, cin)) * s.calls
        res = bench.benchmark({"dense": out / "dense.onnx", "pruned": out / "model.onnx"}, shape, provider="cpu",
                              threads=args.threads, iters=40, seed=0, progress=False, total_seconds=30)
        measured = res.stats["dense"].p50 / res.stats["pruned"].p50
        pw, pk = wall["dense"] / wall["pruned"], kern["dense"] / kern["pruned"]
        print(f"{name:18s} {measured:8.2f}x {pw:14.2f}x {abs(pw - measured) / measured:6.1%} {pk:7.2f}x "
              f"{abs(pk - measured) / measured:6.1%}   (dense p50 {res.stats['dense'].p50:.2f} ms; site sums: "
              f"wall {wall['dense']:.2f} ms, kernels {kern['dense']:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
