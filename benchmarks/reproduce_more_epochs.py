"""Do two of ``deploy-prune reproduce``'s findings that go against the papers change with more finetuning?

* ``schedules``: prune once and retrain vs iterative (3 steps), at equal total epochs, with 1, 2 and 4 epochs per
  step (3, 6 and 12 in total), at ratio 0.8: the experiment's code with a larger budget.
* ``criteria``: the full run's kept widths (``settings.kept_channels`` of its ``reproduce.json``: the 2x target's
  widths), each criterion choosing which channels, finetuned 2 and 6 epochs.

Everything goes through the same functions as ``deploy-prune reproduce`` (one thread, the embedded digits).

    python benchmarks/reproduce_more_epochs.py --full-json benchmarks/results/reproduce-2026-12-03/full.json \\
        --json /tmp/more_epochs.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from deploy_prune.reproduce import criteria_cmp, schedules
from deploy_prune.reproduce.common import baseline_cnn, make_context, mean_std


def run_schedules(ctx: Any, epochs_per_step: list[int], ratio: float) -> list[dict[str, Any]]:
    out = []
    for e in epochs_per_step:
        schedules.FULL.update({"ratios": [ratio], "steps": 3, "epochs_per_step": e})
        t0 = time.time()
        res = schedules.run(ctx)
        top = res["summary"][-1]
        out.append({"epochs_per_step": e, "epochs_total": 3 * e, "once": top["once"]["accuracy_final"],
                    "iterative": top["iterative"]["accuracy_final"], "seconds": round(time.time() - t0, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


def run_criteria(ctx: Any, counts: dict[str, int], names: list[str], epochs: list[int]) -> list[dict[str, Any]]:
    base = baseline_cnn(ctx)
    out = []
    for e in epochs:
        s = {"epochs": e, "slimming_sparsity_epochs": criteria_cmp.FULL["slimming_sparsity_epochs"]}
        for name in names:
            accs = []
            for seed in ctx.seeds:
                torch.manual_seed(seed)
                _, row = criteria_cmp._structured(ctx, base, name, counts, seed, s)
                accs.append(row["accuracy_finetuned"])
            out.append({"criterion": name, "epochs": e, "accuracy_finetuned": mean_std(accs), "per_seed": accs})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-json", type=Path, required=True, help="a full run's reproduce.json (its kept widths)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs-per-step", default="1,2,4")
    ap.add_argument("--criteria", default="random,l1,fpgm,slimming")
    ap.add_argument("--criteria-epochs", default="2,6")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = make_context(quick=False, seeds=args.seeds)
    counts = json.loads(args.full_json.read_text())["criteria"]["settings"]["kept_channels"]
    result = {"schedules": run_schedules(ctx, [int(v) for v in args.epochs_per_step.split(",")], 0.8),
              "criteria": run_criteria(ctx, counts, args.criteria.split(","),
                                       [int(v) for v in args.criteria_epochs.split(",")]),
              "kept_channels": counts, "seeds": ctx.seeds}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
