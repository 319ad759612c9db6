"""Where an ONNX model's time goes, per operator type, from ONNX Runtime's own profiler (CPU provider).

The latency tables of ``--target-speedup`` time each conv/linear layer alone (a conv with a ReLU; a linear layer,
since table version 2, with its bias add and the activation after it, GELU's Erf chain included); whatever else a
model runs (LayerNorm, residual adds, layer-scale muls, layout reorders) is not in them. This prints,
for each file, the mean kernel time per run of every operator type, so you can see how much of a pruned
model's time the tables never saw. Example, on a target bundle::

    deploy-prune run torchvision:convnext_tiny --target-speedup 3 --no-finetune --input-shape 1x3x224x224 \\
        --out /tmp/cx3
    python benchmarks/ort_op_profile.py /tmp/cx3/dense.onnx /tmp/cx3/model.onnx

docs/latency-target-log.md records what it measured on ConvNeXt-T.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

TABLED = ("Conv", "MatMul", "Gemm")  # the layers the latency tables time (the element-wise ops after them aside)


def profile(path: Path, shape: tuple[int, ...], threads: int, runs: int, warmup: int) -> dict[str, float]:
    """Mean kernel ms per run of each operator type."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as deploy-prune's benchmark
    with tempfile.TemporaryDirectory() as tmp:
        warm = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = warm.get_inputs()[0].name
        for _ in range(warmup):
            warm.run(None, {name: x})
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            sess.run(None, {name: x})
        for _ in range(runs):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    return {op: us / (runs + warmup) / 1000 for op, us in per_op.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("onnx", type=Path, nargs="+")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    print(f"ONNX Runtime {ort.__version__}, CPU provider, {args.threads} threads, {args.runs} profiled runs")
    for path in args.onnx:
        ops = profile(path, shape, args.threads, args.runs, args.warmup)
        total = sum(ops.values())
        tabled = sum(v for k, v in ops.items() if k in TABLED)
        print(f"\n{path}: {total:.2f} ms of kernels per run; conv/matmul/gemm {tabled:.2f} ms "
              f"({100 * tabled / total:.0f}%), everything else {total - tabled:.2f} ms")
        for op, ms in ops.items():
            if ms >= 0.01:
                print(f"  {op:<22} {ms:8.2f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
