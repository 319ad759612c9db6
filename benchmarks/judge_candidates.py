"""Does the target search's judge rank its candidates as finetuning does?

Runs ``deploy-prune run ARGS`` in this process with the judge (``--allocation auto`` with data) wrapped, keeps
every candidate the judge scored (pruned, BatchNorm re-estimated, classifier refit, as the judge leaves it),
and after the run finetunes each one with the run's own recipe: for 8, 16 and 32 batches and one epoch (each
then scored as the judge scores, on 20 training batches in the judge's second seeded order, and on the
validation split), and for the run's full ``--epochs`` (validation split). Prints one JSON line per candidate,
in the order of the report's ``target.allocation_choice.candidates``, and writes them to OUT.

    python benchmarks/judge_candidates.py OUT.json run builtin:mnist_cnn --data mnist5k --criterion apoz \\
        --target-speedup 2 --threads 1 --bench-target-seconds 20 --seed 0 --out DIR --force -q

It reaches into private functions (``deploy_prune.prune._allocations``, ``Trainer``): an experiment, not an API.
Used for docs/criteria.md ("A whole classifier after pruned layers is refit too"), at commit 4c92132, where
the judge refit a classifier only when its inputs were narrowed.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from deploy_prune.train.loop import evaluate

P = importlib.import_module("deploy_prune.prune")  # the module; ``deploy_prune.prune`` is also a function
KEPT: list[tuple[float, Any, Any]] = []
_allocations = P._allocations


class Truncated:
    """The first ``n`` batches of ``loader``, as a loader of ``n`` batches."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, n
        self.generator = getattr(loader, "generator", None)

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n


def recording(spec: Any, model: Any, graph: Any, trainer: Any, finetune: bool) -> Any:
    allocations, judge = _allocations(spec, model, graph, trainer, finetune)
    if judge is None:
        return allocations, judge

    def judged(plan: Any) -> float:
        candidate = copy.deepcopy(model)
        P.prune_channels(candidate, graph, plan)
        score = trainer.score(candidate)
        KEPT.append((score, candidate, trainer))
        return score

    return allocations, judged


def judge_score(trainer: Any, model: Any) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trainer.seed + 1)
        return float(evaluate(model, trainer._ordered(trainer.seed + 1), max_batches=20))


def main() -> None:
    out = Path(sys.argv[1])
    P._allocations = recording
    from deploy_prune.cli.main import main as cli

    sys.argv = ["deploy-prune", *sys.argv[2:]]
    try:
        cli()
    except SystemExit as e:
        if e.code:
            raise
    rows = []
    for score, candidate, trainer in KEPT:
        row: dict[str, Any] = {"score": score, "val": trainer.accuracy(candidate),
                               "widths": [m.out_channels for m in candidate.modules()
                                          if isinstance(m, torch.nn.Conv2d)]}
        for n in (8, 16, 32, 0):  # 0: one whole epoch
            m = copy.deepcopy(candidate)
            short = copy.copy(trainer)
            if n:
                short.data = copy.copy(trainer.data)
                short.data.train = Truncated(trainer.data.train, n)
            short.finetune(m, f"{n or 'epoch'} batches", epochs=1)
            row[f"ft{n or 'epoch'}"] = {"score": judge_score(trainer, m), "val": trainer.accuracy(m)}
        m = copy.deepcopy(candidate)
        trainer.finetune(m, "full finetuning")
        row["full_val"] = trainer.accuracy(m)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
