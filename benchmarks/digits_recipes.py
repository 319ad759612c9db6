"""BatchNorm re-estimation and the finetuning recipe on the embedded digits, measured as a user runs them.

Every deploy-prune number comes from ``deploy-prune run builtin:mnist_cnn --data mnist5k ...`` run as a
subprocess, read back from its ``report.json``. Parts (``--parts``):

* ``bn``: l1 at ratio 0.5, no finetuning: accuracy right after pruning with BatchNorm re-estimated and the
  classifier refit (the default), with BatchNorm re-estimated only (``--no-head-refit``) and with neither
  (``--bn-recalib-batches 0``).
* ``target``: ``--target-speedup 3`` with the default recipe, for each ``--seeds``: structured accuracy vs
  dense, and the speedup the final interleaved benchmark measured.
* ``tp``: for each target run, Torch-Pruning's uniform L1 (``MetaPruner`` + ``MagnitudeImportance(p=1)``, the
  classifier ignored, ``round_to`` 8) bisected on its ratio until its measured speedup (interleaved with the
  run's ``dense.onnx`` and ``model.onnx``) is within 5% of ours, then given exactly the same finetuning as the
  CLI gives its structured model: BatchNorm re-estimation, then ``--epochs`` of the default recipe
  (``deploy_prune.train.Trainer`` with the default ``TrainSpec``, the dense model as teacher, the run's seed).
  With ``--tp-plain``, the same pruned model is also finetuned for the same epochs the way a plain training
  loop does (cross-entropy, Adam, constant lr, no distillation, no BatchNorm re-estimation: ``OLD_TRAIN``,
  the ``old`` recipe), since Torch-Pruning ships no finetuning of its own.
* ``alloc``: ``--target-speedup 3`` with each ``--allocation`` (latency, importance, uniform, auto), per seed.
* ``grid``: every ``--grid-criteria`` at every ``--grid-speeds`` target, with the default recipe, without
  BatchNorm re-estimation (``--bn-recalib-batches 0``) and without distillation (``--no-distill``), per seed;
  with ``tp`` also in ``--parts``, Torch-Pruning's uniform L1 matched to each default l1 row's measured speed.
  The speed ``max`` is the fastest reachable one, found as a user finds it: ``--target-speedup 1000`` is
  refused with exit 2 and the error names the fastest speedup measured, F (once per seed, l1, no
  finetuning); the rows then ask for F / 1.05, whose band [0.95 F, 1.05 F] holds F.
* ``slimming``: ``--criterion slimming --ratio 0.5`` with its defaults, per seed.
* ``steps``: ``--ratio 0.5 --steps 3`` against one-shot ``--ratio 0.5``, per seed.
* ``quick``: the ablations behind the defaults (BN batches, distillation alpha and T, ``--steps 3``, slimming's
  cap), through the library's pruning stage (``prune_structured`` + ``Trainer``, the code path ``run`` takes,
  without export, unstructured twin and benchmark), per seed.
* ``old``: the pre-recipe finetuning (``--no-distill --bn-recalib-batches 0 --optimizer adam --weight-decay 0
  --lr-schedule constant --warmup-epochs 0``) for slimming, steps 3 and one-shot, per seed, for comparison.

Runs whose timings are used (the latency-target runs and every Torch-Pruning timing) hold
``/tmp/deploy-prune-bench.lock`` so that they do not overlap other benchmarks on a shared machine; the other
rows report accuracy only. Example (about an hour on a loaded 2-core VM)::

    python benchmarks/digits_recipes.py --seeds 0,1,2 --json /tmp/digits_recipes.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEPLOY_PRUNE = [sys.executable, "-m", "deploy_prune"]
BASE = ["run", "builtin:mnist_cnn", "--data", "mnist5k", "-q", "--force"]
OLD_RECIPE = ["--no-distill", "--bn-recalib-batches", "0", "--optimizer", "adam", "--weight-decay", "0",
              "--lr-schedule", "constant", "--warmup-epochs", "0"]
LOCK = "/tmp/deploy-prune-bench.lock"
ALLOCATIONS = ("latency", "importance", "uniform", "auto")
RECIPES = {"default": [], "no_bn": ["--bn-recalib-batches", "0"], "no_distill": ["--no-distill"],
           "alpha_0.9": ["--distill-alpha", "0.9"]}


LOCK_WAIT_S = [None]  # --lock-wait: give up waiting after this many seconds and run anyway (recorded)
UNLOCKED: list[str] = []  # what ran without the lock


@contextlib.contextmanager
def bench_lock(what: str = "") -> Iterator[None]:
    with open(LOCK, "a") as fh:
        t0, held = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if LOCK_WAIT_S[0] is not None and time.monotonic() - t0 > LOCK_WAIT_S[0]:
                    UNLOCKED.append(what)
                    print(f"  lock not free after {LOCK_WAIT_S[0]} s: running {what} without it", file=sys.stderr)
                    break
                time.sleep(2)
        try:
            yield
        finally:
            if held:
                fcntl.flock(fh, fcntl.LOCK_UN)


def cli(args: list[str], out: Path, timeout: int, lock: bool = False) -> dict[str, Any]:
    """Run deploy-prune with ``args`` into ``out``; the report (plus wall time) or the error. ``lock``: the run's
    timings are used (a latency target), so it holds the benchmark lock."""
    t0 = time.perf_counter()
    with bench_lock(" ".join(args)) if lock else contextlib.nullcontext():
        try:
            proc = subprocess.run(DEPLOY_PRUNE + BASE + args + ["--out", str(out)], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  {' '.join(args)}: timed out after {timeout} s", file=sys.stderr, flush=True)
            return {"error": f"timed out after {timeout} s", "wall_s": timeout}
    wall = round(time.perf_counter() - t0, 1)
    print(f"  {' '.join(args)}: exit {proc.returncode}, {wall} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [""])[-1], "wall_s": wall}
    rep = json.loads((out / "report.json").read_text())
    rep["wall_s"] = wall
    return rep


def variant(rep: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(v for v in rep["variants"] if v["kind"] == kind)


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    if "error" in rep:
        return {"error": rep["error"]}
    st, dn = variant(rep, "structured"), variant(rep, "dense")
    return {"dense": dn["accuracy"], "structured": st["accuracy"], "before_ft": rep["accuracy_before_finetune"]["structured"],
            "speedup": st["speedup_vs_dense"], "macs_kept": round(st["macs"] / dn["macs"], 4),
            "widths": [layer["out_channels_after"] for layer in rep["layers"]], "wall_s": rep["wall_s"],
            "schedule": [(r["accuracy_pruned"], r["accuracy_finetuned"]) for r in rep.get("schedule", [])],
            "target": {k: rep["target"][k] for k in ("value", "achieved", "met")} if "target" in rep else None}


def fastest(seed_args: list[str], out: Path, timeout: int) -> dict[str, Any]:
    """The fastest speedup the planner reaches, as a user learns it: an unreachable target is refused with exit 2
    and its error names the fastest speedup measured. Returns ``{"fastest": F, "target": F / 1.05}`` (the band
    [target, 1.1 target] holds F), or the error when the run was not refused as expected."""
    rep = cli(["--target-speedup", "1000", "--no-finetune", *seed_args], out, timeout, lock=True)
    m = re.search(r"measured speedup ([0-9.]+)x", rep.get("error", ""))
    if not m:
        return {"error": rep.get("error", "the unreachable target was not refused")}
    f = float(m.group(1))
    return {"fastest": f, "target": round(f / 1.05, 2)}


def tp_matched(bundle: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Torch-Pruning's uniform L1 at our measured speed, finetuned with the CLI's default recipe."""
    import torch

    import compare_torch_pruning as C
    from deploy_prune.bench import benchmark
    from deploy_prune.data import load_data
    from deploy_prune.export import export_onnx
    from deploy_prune.loading import load_model
    from deploy_prune.metrics import count_macs
    from deploy_prune.spec import BENCH_MIN_SECONDS, TrainSpec
    from deploy_prune.train import Trainer

    shape = (1, 1, 28, 28)
    models: dict[float, tuple[Any, Path]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tp-digits-"))

    def at(r: float) -> tuple[Any, Path]:
        if r not in models:
            m = load_model("builtin:mnist_cnn").model.eval()
            C.prune_tp(m, shape, r, 8)
            p = tmp / f"tp-{r:.4f}.onnx"
            export_onnx(m, p, torch.randn(*shape))
            models[r] = (m, p)
        return models[r]

    def speeds(files: dict[str, Path], iters: int) -> dict[str, float]:
        with bench_lock(f"torch-pruning timing ({bundle.name})"):
            res = benchmark({"dense": bundle / "dense.onnx", **files}, shape, iters=iters, threads=args.threads,
                            progress=False, min_seconds=BENCH_MIN_SECONDS)  # as the CLI times its variants
        d = res.stats["dense"].p50
        return {k: d / res.stats[k].p50 for k in files}

    ours = speeds({"ours": bundle / "model.onnx"}, args.bench_iters)["ours"]
    lo, hi, tries, found = 0.0, 0.9, [], None
    for _ in range(args.tp_steps):
        r = round((lo + hi) / 2, 4)
        s = speeds({"tp": at(r)[1]}, args.probe_iters)["tp"]
        tries.append((r, round(s, 3)))
        if abs(s / ours - 1) <= 0.05:
            found = r
            break
        lo, hi = (r, hi) if s < ours else (lo, r)
    if found is None:
        found = min(tries, key=lambda rs: abs(rs[1] / ours - 1))[0]
    model, path = at(found)
    final = speeds({"ours": bundle / "model.onnx", "tp": path}, args.bench_iters)
    dense = load_model("builtin:mnist_cnn").model.eval()
    data = load_data("mnist5k", batch_size=64, seed=seed)  # as the CLI loads it for --seed
    plain_model = copy.deepcopy(model)
    trainer = Trainer(data, TrainSpec(), seed, False, teacher=dense)
    trainer.recalibrate(model, "torch-pruning")
    before = trainer.accuracy(model)
    trainer.finetune(model, "finetune torch-pruning")
    out = {"ratio": found, "tries": tries, "speedup_tp": round(final["tp"], 3), "speedup_ours": round(final["ours"], 3),
           "macs_kept": round(count_macs(model, shape) / count_macs(dense, shape), 4), "before_ft": before,
           "accuracy": trainer.accuracy(model)}
    if args.tp_plain:  # the same model and epochs, finetuned as a plain training loop would: cross-entropy, Adam
        plain = Trainer(data, TrainSpec(**OLD_TRAIN), seed, False)  # no teacher: no distillation, no head refit
        plain.finetune(plain_model, "finetune torch-pruning, plain")
        out["accuracy_plain"] = plain.accuracy(plain_model)
    return out


QUICK = [  # (label, PruneSpec keywords, TrainSpec keywords; "old" = the pre-recipe finetuning)
    ("l1 0.5, no finetuning, BN re-estimated (20 batches)", {"ratio": 0.5}, {"epochs": 0, "bn_recalib_batches": 20}),
    ("l1 0.5, no finetuning, BN re-estimated (50 batches)", {"ratio": 0.5}, {"epochs": 0}),
    ("l1 0.5, old recipe", {"ratio": 0.5}, {"old": True}),
    ("l1 0.5, default recipe, alpha 0.9", {"ratio": 0.5}, {"distill_alpha": 0.9}),
    ("l1 0.5, default recipe, alpha 0.5, T 2", {"ratio": 0.5}, {"distill_temperature": 2.0}),
    ("l1 0.5, default recipe (alpha 0.5, T 4)", {"ratio": 0.5}, {}),
    ("l1 0.5, default recipe, --no-distill", {"ratio": 0.5}, {"distill": False}),
    ("l1 0.5 --steps 3, old recipe", {"ratio": 0.5, "steps": 3}, {"old": True}),
    ("l1 0.5 --steps 3, default recipe", {"ratio": 0.5, "steps": 3}, {}),
    ("l1 0.5 --steps 3, --no-distill", {"ratio": 0.5, "steps": 3}, {"distill": False}),
    ("slimming 0.5, default recipe, uncapped (--slimming-max-layer-ratio 1)", {"criterion": "slimming", "ratio": 0.5,
                                                                             "slimming_max_layer_ratio": 1.0}, {}),
    ("slimming 0.5, default recipe and cap", {"criterion": "slimming", "ratio": 0.5}, {}),
]
OLD_TRAIN = {"optimizer": "adam", "weight_decay": 0.0, "lr_schedule": "constant", "warmup_epochs": 0.0,
             "distill": False, "bn_recalib_batches": 0}


def quick(seed: int) -> dict[str, Any]:
    """The recipe's ablations through the library's pruning stage (the code path `run` takes, without the
    export, the unstructured twin and the benchmark): prune_structured + Trainer, one seed."""
    from deploy_prune.criteria.slimming import SlimmingOptions
    from deploy_prune.data import load_data
    from deploy_prune.loading import load_model
    from deploy_prune.prune import prune_structured
    from deploy_prune.spec import PruneSpec, TrainSpec
    from deploy_prune.train import Trainer

    data = load_data("mnist5k", batch_size=64, seed=seed)
    dense = load_model("builtin:mnist_cnn").model.eval()
    out = {}
    for label, pk, tk in QUICK:
        pk, tk = dict(pk), dict(tk)
        train = {**(OLD_TRAIN if tk.pop("old", False) else {}), **tk}
        cap = pk.pop("slimming_max_layer_ratio", None)
        if cap is not None:
            pk["options"] = SlimmingOptions(slimming_max_layer_ratio=cap)
        t0 = time.perf_counter()
        trainer = Trainer(data, TrainSpec(**train), seed, False, teacher=dense)
        p = prune_structured(copy.deepcopy(dense), PruneSpec(**pk, seed=seed), (1, 1, 28, 28), trainer)
        out[label] = {"before_ft": p.accuracy_before_finetune, "structured": trainer.accuracy(p.model),
                      "dense": trainer.accuracy(dense), "widths": [p.plan.width_after(n) for n in p.plan.widths],
                      "schedule": [(r["accuracy_pruned"], r["accuracy_finetuned"]) for r in p.steps],
                      "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"  {label}: {out[label]}", file=sys.stderr, flush=True)
    return out


def mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 2) if xs else None


def fmt(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.fmean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "") + \
        f" ({', '.join(f'{x:.1f}' for x in xs)})"


def table(res: dict[str, Any]) -> str:
    rows = ["| row | measured | target |", "|---|---|---|"]
    if "bn" in res:
        b = res["bn"]
        rows.append(f"| l1 ratio 0.5, accuracy right after pruning | BN re-estimated + head refit (default) "
                    f"{b['on']['before_ft']}%, BN re-estimated only (--no-head-refit) "
                    f"{b.get('bn_only', {}).get('before_ft', '—')}%, stale BN {b['off']['before_ft']}% | ≥ 80% |")
    t = res.get("target", {})
    if t:
        dense = [s["dense"] for s in t.values() if "dense" in s]
        acc = [s.get("structured") for s in t.values()]
        ach = [s["target"]["achieved"] for s in t.values() if s.get("target")]
        rows.append(f"| --target-speedup 3, l1 default recipe: structured accuracy | {fmt(acc)} vs dense "
                    f"{mean(dense)}; loss {round(mean(dense) - mean(acc), 2) if acc and dense else '—'} points; "
                    f"achieved {fmt(ach)}x | loss ≤ 0.5 |")
    tp = res.get("tp", {})
    if tp:
        rows.append(f"| Torch-Pruning uniform L1 at the same measured speed, same finetuning | {fmt([s.get('accuracy') for s in tp.values()])}; "
                    f"speedup TP {fmt([s.get('speedup_tp') for s in tp.values()])}x vs ours "
                    f"{fmt([s.get('speedup_ours') for s in tp.values()])}x (same interleaved run) | ours higher |")
        if any("accuracy_plain" in s for s in tp.values()):
            rows.append(f"| the same Torch-Pruning models, plain finetuning (cross-entropy, Adam, same epochs) | "
                        f"{fmt([s.get('accuracy_plain') for s in tp.values()])} | ours higher |")
    for name in ALLOCATIONS:
        if res.get(f"alloc_{name}"):
            rows.append(f"| --target-speedup 3 --allocation {name} | "
                        f"{fmt([s.get('structured') for s in res[f'alloc_{name}'].values()])}; achieved "
                        f"{fmt([(s.get('target') or {}).get('achieved') for s in res[f'alloc_{name}'].values()])}x | — |")
    for key, runs in res.get("grid", {}).items():
        tp = res.get("grid_tp", {}).get(key)
        asked = "" if " max" not in key else \
            f"; asked {', '.join(str((s.get('target') or {}).get('value')) for s in runs.values())}x"
        rows.append(f"| {key} | {fmt([s.get('structured') for s in runs.values()])}{asked}; before finetuning "
                    f"{fmt([s.get('before_ft') for s in runs.values()])}; achieved "
                    f"{fmt([(s.get('target') or {}).get('achieved') for s in runs.values()])}x"
                    + (f"; Torch-Pruning at the same speed {fmt([t.get('accuracy') for t in tp.values()])}" if tp else "")
                    + " | — |")
    for key, label, goal in (("slimming", "slimming --ratio 0.5, defaults", "loss ≤ 1 vs dense"),
                             ("steps3", "l1 --ratio 0.5 --steps 3", "within 0.5 of one-shot"),
                             ("oneshot", "l1 --ratio 0.5 one-shot", "—"),
                             ("old_slimming", "slimming, old recipe", "—"), ("old_steps3", "steps 3, old recipe", "—"),
                             ("old_oneshot", "one-shot, old recipe", "—")):
        if res.get(key):
            rows.append(f"| {label} | {fmt([s.get('structured') for s in res[key].values()])} "
                        f"(dense {mean([s.get('dense') for s in res[key].values()])}) | {goal} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="bn,target,tp,slimming,steps")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bench-iters", type=int, default=50)
    ap.add_argument("--probe-iters", type=int, default=30)
    ap.add_argument("--tp-steps", type=int, default=7)
    ap.add_argument("--tp-plain", action="store_true",
                    help="also finetune Torch-Pruning's model with the plain recipe (--no-distill, no BatchNorm "
                         "re-estimation, Adam, constant lr), the same epochs")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads for the target runs and Torch-Pruning's timings (default: "
                         "deploy-prune's default). At 28x28 the model runs in 0.05-0.2 ms, where a second thread's "
                         "wake-up costs more than it saves and makes 2-thread timings bimodal: use 1")
    ap.add_argument("--grid-criteria", default="l1,fpgm,apoz,slimming,random,lottery")
    ap.add_argument("--grid-speeds", default="2,3,max",
                    help="targets for the grid; max: the fastest reachable speed (see the module docstring)")
    ap.add_argument("--bench-target-seconds", type=float, default=None,
                    help="passed to every target run (deploy-prune's default: 60 s for the final benchmark)")
    ap.add_argument("--grid-recipes", default="default,no_bn,no_distill")
    ap.add_argument("--work", type=Path, default=None, help="keep the bundles here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--lock-wait", type=float, default=None,
                    help="stop waiting for the benchmark lock after this many seconds and run anyway; the "
                         "result's `unlocked` lists what ran without it (default: wait)")
    args = ap.parse_args()
    LOCK_WAIT_S[0] = args.lock_wait
    parts = set(args.parts.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="digits-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    res: dict[str, Any] = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    it = ["--bench-iters", str(args.bench_iters)]
    th = ["--threads", str(args.threads)] if args.threads else []
    bt = ["--bench-target-seconds", str(args.bench_target_seconds)] if args.bench_target_seconds else []

    def save() -> None:
        res["unlocked"] = UNLOCKED
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))

    if "quick" in parts:
        res["quick"] = {seed: quick(seed) for seed in seeds}
        save()
    if "bn" in parts:
        res["bn"] = {k: summary(cli(["--ratio", "0.5", "--no-finetune", *extra, *it], work / f"bn-{k}", args.timeout))
                     for k, extra in (("on", []), ("bn_only", ["--no-head-refit"]),
                                      ("off", ["--bn-recalib-batches", "0"]))}
        save()
    for seed in seeds:
        sd = ["--seed", str(seed), *it]
        if "target" in parts:
            out = work / f"target-{seed}"
            res.setdefault("target", {})[seed] = summary(cli(["--target-speedup", "3", *th, *sd], out, args.timeout,
                                                             lock=True))
            save()
            if "tp" in parts and "error" not in res["target"][seed]:
                res.setdefault("tp", {})[seed] = tp_matched(out, seed, args)
                save()
        if "alloc" in parts:
            for name in ALLOCATIONS:
                res.setdefault(f"alloc_{name}", {})[seed] = summary(cli(
                    ["--target-speedup", "3", "--allocation", name, *th, *sd], work / f"alloc-{name}-{seed}",
                    args.timeout, lock=True))
                save()
        if "slimming" in parts:
            res.setdefault("slimming", {})[seed] = summary(cli(["--criterion", "slimming", "--ratio", "0.5", *sd],
                                                               work / f"slim-{seed}", args.timeout))
            save()
        if "steps" in parts:
            for key, extra in (("steps3", ["--steps", "3"]), ("oneshot", [])):
                res.setdefault(key, {})[seed] = summary(cli(["--ratio", "0.5", *extra, *sd], work / f"{key}-{seed}",
                                                            args.timeout))
                save()
        if "old" in parts:
            for key, extra in (("old_slimming", ["--criterion", "slimming"]), ("old_steps3", ["--steps", "3"]),
                               ("old_oneshot", [])):
                res.setdefault(key, {})[seed] = summary(cli(["--ratio", "0.5", *extra, *OLD_RECIPE, *sd],
                                                            work / f"{key}-{seed}", args.timeout))
                save()
        print(table(res), file=sys.stderr, flush=True)
    if "grid" in parts:  # row by row, seeds innermost: a row's mean and spread are complete before the next starts
        speeds = args.grid_speeds.split(",")
        top = {}
        if "max" in speeds:
            for seed in seeds:
                top[seed] = res.setdefault("grid_fastest", {})[seed] = fastest(
                    ["--seed", str(seed), *it, *th], work / f"fastest-{seed}", args.timeout)
                save()
        for crit in args.grid_criteria.split(","):
            for x in speeds:
                for recipe in args.grid_recipes.split(","):
                    key = f"{crit} --target-speedup {x}" + ("" if recipe == "default" else f", {recipe}")
                    for seed in seeds:
                        if x == "max" and "error" in top[seed]:
                            continue
                        ask = str(top[seed]["target"]) if x == "max" else x
                        res.setdefault("grid", {}).setdefault(key, {})[seed] = summary(cli(
                            ["--criterion", crit, "--target-speedup", ask, *RECIPES[recipe], *th, *bt, "--seed",
                             str(seed), *it], work / f"grid-{crit}-{x}-{recipe}-{seed}", args.timeout, lock=True))
                        save()
                print(table(res), file=sys.stderr, flush=True)
        if "tp" in parts:  # Torch-Pruning last: the criteria's rows first when time is short
            for key, runs in list(res.get("grid", {}).items()):
                if key.startswith("l1 ") and "," not in key:
                    for seed, rep in runs.items():
                        if "error" not in rep:
                            x = key.split()[-1]
                            res.setdefault("grid_tp", {}).setdefault(key, {})[seed] = tp_matched(
                                work / f"grid-l1-{x}-default-{seed}", seed, args)
                            save()
    res["table"] = table(res)
    save()
    print(res["table"])


if __name__ == "__main__":
    main()
