"""How much a time floor steadies the speedup of a sub-millisecond model (``--bench-min-seconds``).

Makes a bundle as a user would (``deploy-prune run builtin:mnist_cnn --no-finetune --ratio R --threads 1``),
then times its ``dense.onnx`` against its ``model.onnx`` in ``--repeats`` fresh interleaved runs of
``deploy_prune.bench.benchmark`` for each setting: a fixed number of iterations (``--iters``, the target
search's 50 and the CLI's 100), and the CLI's default floor of 0.5 s per variant. It prints each setting's
speedups, their mean and their coefficient of variation, all measured side by side in this one run.

    python benchmarks/bench_floor.py --ratio 0.75 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", default="50,100", help="fixed iteration counts to compare with the floor")
    args = ap.parse_args()

    from deploy_prune.bench import benchmark
    from deploy_prune.spec import BENCH_MIN_SECONDS

    out = Path(tempfile.mkdtemp(prefix="bench-floor-")) / "bundle"
    subprocess.run([sys.executable, "-m", "deploy_prune", "run", "builtin:mnist_cnn", "--no-finetune", "--ratio",
                    str(args.ratio), "--threads", str(args.threads), "-q", "--out", str(out)], check=True)
    files = {"dense": out / "dense.onnx", "structured": out / "model.onnx"}
    settings = [(int(n), 0.0) for n in args.iters.split(",")] + [(100, BENCH_MIN_SECONDS)]
    rows = {s: [] for s in settings}
    ran = {s: 0 for s in settings}
    for _ in range(args.repeats):  # the settings interleaved, so drift of the machine hits them alike
        for iters, floor in settings:
            r = benchmark(files, (1, 1, 28, 28), threads=args.threads, iters=iters, min_seconds=floor,
                          progress=False)
            rows[(iters, floor)].append(r.stats["dense"].p50 / r.stats["structured"].p50)
            ran[(iters, floor)] = r.iters
    dense_ms = r.stats["dense"].p50
    print(f"builtin:mnist_cnn ratio {args.ratio}, dense p50 {dense_ms:.3f} ms, {args.threads} thread(s), "
          f"{args.repeats} fresh interleaved runs per setting")
    print("| setting | iterations | speedups | mean | coefficient of variation |")
    print("|---|---:|---|---:|---:|")
    for (iters, floor), sp in rows.items():
        name = f"--bench-min-seconds {floor:g}" if floor else f"{iters} iterations, no floor"
        cv = 100 * statistics.pstdev(sp) / statistics.mean(sp)
        print(f"| {name} | {ran[(iters, floor)]} | {', '.join(f'{x:.2f}' for x in sp)} | "
              f"{statistics.mean(sp):.2f}x | {cv:.1f}% |")


if __name__ == "__main__":
    main()
