"""Run the reproduction experiments and write ``reproduce.json``, ``reproduce.md`` and one PNG per experiment.

The output folder is written elsewhere first and moved into place at the end, so an interrupted or failed run
leaves no half-written folder (as ``run`` does with its bundle).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from deploy_prune.errors import BadInput, opt
from deploy_prune.reproduce import (apoz_lenet, criteria_cmp, l1_modes, lottery, schedules, sensitivity,
                                    slimming_gamma)

EXPERIMENTS: dict[str, ModuleType] = {m.NAME: m for m in (sensitivity, l1_modes, schedules, slimming_gamma, apoz_lenet,
                                                           lottery, criteria_cmp)}
DEFAULT_SEEDS = {True: 2, False: 3}  # quick, full
VERSION = 1


def parse_only(only: str | None) -> list[str]:
    """``--only a,b`` → the experiments in the runner's order; all of them for None."""
    if only is None:
        return list(EXPERIMENTS)
    asked = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [a for a in asked if a not in EXPERIMENTS]
    if unknown or not asked:
        raise BadInput(f"{opt('only')} {only!r}: unknown experiment {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(EXPERIMENTS)}")
    return [n for n in EXPERIMENTS if n in asked]


def _environment() -> dict[str, Any]:
    import torch

    from deploy_prune.bench import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads":
            torch.get_num_threads(), "python": platform.python_version(), "nice": os.nice(0),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def _cpu() -> float:
    """CPU seconds this process has used (user + system): unlike wall time, not inflated by other load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reproduce(out: Path, *, seeds: int | None = None, quick: bool = False, only: str | None = None,
              force: bool = False, threads: int = 1, say: Callable[[str], None] = lambda _: None,
              progress: bool = False) -> dict[str, Any]:
    """Run the selected experiments and write the results folder ``out``; return what ``reproduce.json`` holds.

    Args:
        out: the results folder (refused if it exists and is not empty, unless ``force``).
        seeds: seeds to average over (default 2 quick, 3 full); a quick run uses them all only in ``criteria``
            and ``lottery``.
        quick: the short settings (minutes on two CPU cores) instead of the full ones.
        only: comma-separated experiment names (``deploy_prune.reproduce.EXPERIMENTS``); None = all.
        force: replace a non-empty ``out``.
        threads: torch intra-op threads for training and evaluation (restored afterwards). One by default: these
            models are small, and on a loaded 2-core machine two threads made a LeNet-300-100 epoch 8x slower
            than one (5.3 s against 0.63 s at load average 11). The ONNX Runtime benchmark keeps its own default.
    """
    import torch

    from deploy_prune.reproduce.common import make_context

    names = parse_only(only)
    n_seeds = DEFAULT_SEEDS[quick] if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise BadInput(f"{opt('seeds')} must be an integer >= 1, got {seeds!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadInput(f"{opt('threads')} must be an integer >= 1, got {threads!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{opt('out')} {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BadInput(f"{opt('out')} {out} is not empty: pass {opt('force')} to replace it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx = make_context(quick, n_seeds, say, progress)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"version": VERSION, "mode": "quick" if quick else "full", "seeds": n_seeds,
                              "experiments": names, "environment": _environment(), "seconds": {},
                              "cpu_seconds": {}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t_all = time.perf_counter()
        for name in names:
            mod = EXPERIMENTS[name]
            say(f"== {name}: {mod.TITLE}")
            t0, c0 = time.perf_counter(), _cpu()
            res = mod.run(ctx)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            res["cpu_seconds"] = round(_cpu() - c0, 1)
            result["cpu_seconds"][name] = res["cpu_seconds"]
            res["plot"] = f"{name}.png"
            mod.plot(res, tmp / res["plot"])
            result[name] = res
            result["seconds"][name] = res["seconds"]
            say(f"== {name}: {res['seconds']:.0f} s; {res['finding']['measured']}")
        result["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
        result["cpu_seconds"]["total"] = round(sum(result["cpu_seconds"].values()), 1)
        result["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        (tmp / "reproduce.json").write_text(json.dumps(result, indent=2))
        (tmp / "reproduce.md").write_text(markdown(result))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The human report: the findings first, then one section per experiment with the paper's numbers beside ours."""
    from deploy_prune.reproduce.common import table

    env = result["environment"]
    lines = [f"# deploy-prune reproduce ({result['mode']})", "",
             f"Seeds: {result['seeds']}. Data: mnist5k (4,000 training / 1,000 validation digits). Machine: {env['cpu']}, "
             f"{env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads), nice {env['nice']}; load "
             f"average {env['loadavg_start']} at the start, {env.get('loadavg_end')} at the end. Total "
             f"{result['seconds'].get('total', 0) / 60:.1f} min wall, "
             f"{result.get('cpu_seconds', {}).get('total', 0) / 60:.1f} min of CPU time (about what a free machine "
             "takes at one thread).", "",
             "## Findings", ""]
    lines += table(["experiment", "the paper's direction", "holds here", "measured", "seconds (CPU seconds)"],
                   [[n, result[n]["finding"]["claim"], "yes" if result[n]["finding"]["holds"] else "**no**",
                     result[n]["finding"]["measured"], f"{result[n]['seconds']} ({result[n].get('cpu_seconds')})"]
                    for n in result["experiments"]])
    for name in result["experiments"]:
        mod, res = EXPERIMENTS[name], result[name]
        settings = {k: v for k, v in res["settings"].items() if k not in ("kept_channels", "widths_from")}
        lines += ["", f"## {mod.TITLE}", "",
                  f"**Paper** ({res['paper']['source']}): {res['paper'].get('claim', '')}".rstrip(), "",
                  f"**Settings**: `{json.dumps(settings)}`", "", *mod.markdown(res), "",
                  f"![{name}]({res['plot']})", ""]
    return "\n".join(lines) + "\n"
