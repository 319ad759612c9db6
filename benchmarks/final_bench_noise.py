"""How much one final benchmark's speedup varies from run to run, at a few lengths of the interleaved run.

A torchvision model (random init) and its L1-pruned copy are exported once; the dense file is also copied
under a second name, standing in for the unstructured-sparse variant, which runs the same dense kernels. The
three are then timed together by deploy-prune's interleaved benchmark (the one ``deploy-prune run`` ends with),
``--reps`` times at each ``--iters``, the lengths alternated. Printed per length: every speedup
(p50 dense / p50 pruned), their coefficient of variation and range, the control ratio p50 copy / p50 dense,
and the seconds one run took. This is what sets ``--bench-target-seconds`` (docs/onnx-runtime.md §3).

    nice -n -15 python benchmarks/final_bench_noise.py --model convnext_tiny --ratio 0.2 --reps 6
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="convnext_tiny", help="torchvision model name")
    ap.add_argument("--ratio", type=float, default=0.2, help="L1 ratio of the pruned copy")
    ap.add_argument("--reps", type=int, default=6, help="runs per length")
    ap.add_argument("--iters", default="100,400", help="comma-separated iterations per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write every run here")
    args = ap.parse_args()

    import torch

    import deploy_prune as dp
    from deploy_prune import bench
    from deploy_prune.loading import load_model

    lengths = [int(i) for i in args.iters.split(",")]
    x = torch.randn(1, 3, 224, 224)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = load_model(f"torchvision:{args.model}", seed=0).model.eval()
        dp.export(model, x, d / "dense.onnx")
        shutil.copy(d / "dense.onnx", d / "copy.onnx")
        dp.export(dp.prune(model, x, criterion="l1", ratio=args.ratio).model, x, d / "pruned.onnx")
        files = {"dense": d / "dense.onnx", "copy": d / "copy.onnx", "pruned": d / "pruned.onnx"}
        for rep in range(args.reps):
            for iters in lengths:
                t0 = time.perf_counter()
                res = bench.benchmark(files, tuple(x.shape), threads=args.threads, iters=iters, seed=rep,
                                      progress=False, min_seconds=0.5)
                p50 = {k: s.p50 for k, s in res.stats.items()}
                runs.append({"iters": iters, "speedup": p50["dense"] / p50["pruned"],
                             "control": p50["copy"] / p50["dense"], "dense_ms": p50["dense"],
                             "seconds": time.perf_counter() - t0})
                print(json.dumps(runs[-1]), flush=True)
    for iters in lengths:
        r = [x["speedup"] for x in runs if x["iters"] == iters]
        c = [x["control"] for x in runs if x["iters"] == iters]
        sec = statistics.fmean(x["seconds"] for x in runs if x["iters"] == iters)
        cv = statistics.stdev(r) / statistics.fmean(r) if len(r) > 1 else 0.0
        print(f"{iters} iterations ({sec:.0f} s a run): speedups {', '.join(f'{v:.3f}' for v in r)}; "
              f"CV {cv:.1%}, range {min(r):.3f}-{max(r):.3f}; control {', '.join(f'{v:.3f}' for v in c)}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
