"""How far a target run's final benchmark lands from the probe its search chose: the spread behind
``target.FINAL_NOISE``.

Reads the ``report.json`` of target runs (``deploy-prune run ... --target-speedup X``; e.g. the bundles that
``benchmarks/latency_target.py --work DIR`` keeps) and prints, per run, the chosen probe's confirmed speedup, the
final benchmark's, and the log of their ratio; then the spread over all runs::

    python benchmarks/final_vs_probe.py '/tmp/lt*/work/*/report.json'

With ``--replay``, it prints instead, for every run that searched more than one allocation, the candidates
(measured speedup, MACs, chance of staying in the band) and which one ``deploy_prune.target``'s current rule
picks (``_unjudged_rank`` without data, ``_judged_rank`` with the stored judge scores) against the one the run
kept, with the final benchmark's speedup: a rule change replayed on stored runs without timing anything again.

docs/latency-target-log.md records what it measured.
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
    ap.add_argument("--replay", action="store_true",
                    help="replay the current allocation choice rule on each run's stored candidates")
    args = ap.parse_args()
    paths = sorted({p for pat in args.patterns for p in glob.glob(pat)})
    if args.replay:
        return replay(paths)
    logs = []
    for path in paths:
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


def replay(paths: list[str]) -> None:
    from deploy_prune.spec import Target
    from deploy_prune.target import Probe, _judged_rank, _unjudged_rank, stays_in_band

    changed = n = 0
    for path in paths:
        target = json.loads(Path(path).read_text()).get("target") or {}
        choice = target.get("allocation_choice") or {}
        cands = [c for c in choice.get("candidates", []) if not c.get("unreachable")]
        if len(cands) < 2:
            continue
        n += 1
        x = Target(target["kind"], target["value"])
        probes = [Probe(0, c["macs"], c["measured"], c["measured"], 1.0, 1.0, c["measured"], c["allocation"])
                  for c in cands]
        judged = all(c.get("score") is not None for c in cands)
        rank = [(_judged_rank(x, p, c["score"], -i) if judged else _unjudged_rank(x, p, -i))
                for i, (p, c) in enumerate(zip(probes, cands))]
        pick = cands[max(range(len(cands)), key=lambda i: rank[i])]["allocation"]
        changed += pick != choice["chosen"]
        listed = "; ".join(f"{c['allocation']} {c['measured']:.3f}x {c['macs'] / 1e6:.1f}M "
                           f"chance {stays_in_band(x, c['measured']):.2f}"
                           + (f" score {c['score']:.2f}" if judged else "") for c in cands)
        print(f"{path}: {x.kind} {x.value:g}: {listed} | kept {choice['chosen']} -> final {target['achieved']:.3f}x"
              f" | now {pick}{'  CHANGED' if pick != choice['chosen'] else ''}")
    print(f"{n} runs with several candidates; the current rule changes {changed} choices")


if __name__ == "__main__":
    main()
