"""How far apart the final benchmark's control pair landed, bundle by bundle, against whether the target was met.

The unstructured-sparse model runs the dense model's kernels (ONNX Runtime multiplies its zeros like any other
weight), so in one interleaved run its p50 should equal dense's. How far the two land apart is the noise of
that run, and the structured speedup is read off the same dense p50. This reads bundles written by
``deploy-prune run`` (``report.json`` and ``latency_samples.json``) and prints, per bundle, the control ratio
p50(unstructured) / p50(dense) of the run whose numbers the report gives, the structured speedup, and the
target's outcome; bundles written since the control was added also list every interleaved run the control asked
for (``bench.control`` in the report).

    python benchmarks/control_pair.py /tmp/lt/work/*/ --tolerance 0.03
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from deploy_prune.timing import BenchResult, LatencyStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path, help="bundle folders written by deploy-prune run")
    ap.add_argument("--tolerance", type=float, default=0.03, help="control tolerance to tally against (relative)")
    args = ap.parse_args()
    rows = []
    for b in args.bundles:
        try:
            rep = json.loads((b / "report.json").read_text())
            samples = json.loads((b / "latency_samples.json").read_text())["samples"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            print(f"{b}: skipped ({e})")
            continue
        if "unstructured" not in samples or "structured" not in samples:
            print(f"{b}: skipped (no unstructured or structured samples)")
            continue
        p50 = {k: statistics.median(v) for k, v in samples.items()}
        target = rep.get("target") or {}
        bench = rep.get("bench") or {}
        control = bench.get("control")
        result = BenchResult(stats={k: LatencyStats.from_samples(v) for k, v in samples.items()}, samples=samples,
                             provider="", threads=0, method="", block=bench.get("block", 0),
                             drop=bench.get("drop", 0))
        rows.append((b.name, p50["unstructured"] / p50["dense"], p50["dense"] / p50["structured"],
                     result.paired_speedups("dense")["structured"], result.drift("dense"), target.get("value"),
                     target.get("met"),
                     [r["control_ratio"] for r in control["runs"]] if control else None))
    print("| bundle | control ratio | structured speedup | round by round | drift | target | met | control runs |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, ratio, speed, paired, drift, value, met, runs in rows:
        print(f"| {name} | {ratio:.3f} | {speed:.3f}x | {paired:.3f}x | {drift:.1%} | "
              f"{'' if value is None else f'{value:g}x'} | "
              f"{'' if met is None else ('yes' if met else '**no**')} | {'' if runs is None else runs} |")
    off = [r for r in rows if abs(r[1] - 1) > args.tolerance]
    devs = sorted(abs(r[1] - 1) for r in rows)
    print(f"\n{len(rows)} bundles; control off by a median of {statistics.median(devs):.1%} (max {devs[-1]:.1%}); "
          f"beyond ±{args.tolerance:.0%}: {len(off)}")
    apart = [abs(r[2] / r[3] - 1) for r in rows]
    print(f"structured speedup from the p50s vs round by round: apart by a median of {statistics.median(apart):.1%} "
          f"(max {max(apart):.1%}); beyond ±{args.tolerance:.0%}: {sum(a > args.tolerance for a in apart)}; "
          f"drift (apart beyond the rounds' own spread, any variant) beyond {args.tolerance:.0%}: "
          f"{sum(r[4] > args.tolerance for r in rows)}")
    targeted = [r for r in rows if r[6] is not None]
    for met in (False, True):
        group = [r for r in targeted if r[6] is met]
        n_off = sum(abs(r[1] - 1) > args.tolerance for r in group)
        print(f"target {'met' if met else 'missed'}: {len(group)} runs, {n_off} with the control beyond "
              f"±{args.tolerance:.0%}")


if __name__ == "__main__":
    main()
