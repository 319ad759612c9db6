"""How far a target run's final benchmark lands from the probe its search chose: the spread behind
``target.FINAL_NOISE``.

Reads the ``report.json`` of target runs (``deploy-prune run ... --target-speedup X``; e.g. the bundles that
``benchmarks/latency_target.py --work DIR`` keeps) and prints, per run, the chosen probe's confirmed speedup, the
final benchmark's, and the log of their ratio; then the spread over all runs::

    python benchmarks/final_vs_probe.py '/tmp/lt*/work/*/report.json'

docs/latency-target.md records what it measured.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("patterns", nargs="+", help="report.json files or glob patterns")
    args = ap.parse_args()
    logs = []
    for path in sorted({p for pat in args.patterns for p in glob.glob(pat)}):
        target = json.loads(Path(path).read_text()).get("target")
        if not target or target.get("kind") != "speedup" or target.get("chosen_probe") is None:
            continue
        probe = target["probes"][target["chosen_probe"]]
        x = math.log(target["achieved"] / probe["measured"])
        logs.append(x)
        print(f"{path}: probe {probe['measured']:.3f}x (timings {probe.get('repeats')}), final "
              f"{target['achieved']:.3f}x, log ratio {x:+.3f}")
    if not logs:
        raise SystemExit("no target run reports matched")
    mags = [abs(x) for x in logs]
    med = statistics.median(logs)
    mad = statistics.median(abs(x - med) for x in logs)
    print(f"{len(logs)} runs: log ratio mean {statistics.mean(logs):+.4f}, sd {statistics.pstdev(logs):.4f}, "
          f"median |log| {statistics.median(mags):.4f}, 1.4826 x MAD {1.4826 * mad:.4f}; beyond 3%: "
          f"{sum(m > 0.03 for m in mags) / len(mags):.0%}, beyond 5%: {sum(m > 0.05 for m in mags) / len(mags):.0%}")


if __name__ == "__main__":
    main()
