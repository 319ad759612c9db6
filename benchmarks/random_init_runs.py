"""`deploy-prune run torchvision:NAME --no-finetune` on every torchvision classifier, random init, end to end.

The contract says such a run ends with exit 0, or exit 2 with a one-line reason. This script runs the real
command line (not library calls) for every model of ``torchvision.models.list_models(module=torchvision.models)``,
smallest first, one subprocess per model, each holding ``/tmp/deploy-prune-bench.lock`` (flock, so its benchmark
does not overlap other timing jobs on the machine) with a wall-clock timeout and an address-space cap. It records
the exit code, the ``error:`` line, the wall time (after the lock was acquired) and, for a bundle, the structured speedup and how parity was
proven (zero outputs are checked at the classifier's input, torchvision's ViTs have a zero-initialised head),
and rewrites the table in ``--out`` after every model, so an interrupted run still leaves a valid table.

Example (the command that regenerates docs/random-init.md)::

    python benchmarks/random_init_runs.py --out docs/random-init.md --json /tmp/random_init.json

Re-run some models and merge them into an earlier result::

    python benchmarks/random_init_runs.py --models vit_b_16,alexnet --update --json /tmp/random_init.json \\
        --out docs/random-init.md
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOCK = "/tmp/deploy-prune-bench.lock"
CONDITIONS = "a shared 2-core VM."

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchvision_coverage import input_size  # noqa: E402 - the same input sizes as the coverage run


def models_by_size() -> list[tuple[str, int]]:
    """Every torchvision classifier with its parameter count (built on the meta device: no memory, no time)."""
    import torch
    import torchvision

    from deploy_prune.loading import build_arch

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                model, _ = build_arch(f"torchvision:{name}")
        except (NotImplementedError, RuntimeError):  # an init that copies data (e.g. trunc_normal via CPU)
            model, _ = build_arch(f"torchvision:{name}")
        out.append((name, sum(p.numel() for p in model.parameters())))
    return sorted(out, key=lambda t: (t[1], t[0]))


def _cap(gb: float):  # noqa: ANN202
    def limit() -> None:
        if gb > 0:
            cap = int(gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return limit


def run_one(name: str, params: int, args: argparse.Namespace) -> dict[str, Any]:
    hw = input_size(name, args.cnn_size)
    shape = f"1x3x{hw}x{hw}"
    tmp = Path(tempfile.mkdtemp(prefix=f"rir-{name}-"))
    out = tmp / "bundle"
    cmd = [sys.executable, "-m", "deploy_prune", "run", f"torchvision:{name}", "--no-finetune",
           "--input-shape", shape, "--bench-iters", str(args.bench_iters), "--provider", args.provider,
           "--threads", str(args.threads), "-q", "--out", str(out)]
    r: dict[str, Any] = {"model": name, "params": params, "input_shape": shape,
                         "command": "deploy-prune " + " ".join(cmd[cmd.index("run"):-2]) + " --out DIR"}
    lock = open(LOCK, "a")  # noqa: SIM115 - held for the whole run, like `flock LOCK deploy-prune run ...`
    waited = time.perf_counter()
    fcntl.flock(lock, fcntl.LOCK_EX)
    r["lock_wait_s"] = round(time.perf_counter() - waited, 1)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, preexec_fn=_cap(args.mem_gb),
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
        r["exit"] = proc.returncode
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        r["error"] = errors[-1] if errors else (proc.stderr.strip().splitlines()[-1][:300]
                                                if proc.returncode and proc.stderr.strip() else None)
        r["stderr_lines"] = len([ln for ln in proc.stderr.splitlines() if ln.strip()])
        if proc.returncode == 0 and (out / "report.json").exists():
            rep = json.loads((out / "report.json").read_text())
            v = {x["kind"]: x for x in rep["variants"]}
            r["speedup"] = round(v["structured"]["speedup_vs_dense"], 2)
            r["mac_ratio"] = round(v["dense"]["macs"] / max(v["structured"]["macs"], 1), 2)
            r["parity_ok"] = all(x["parity"]["ok"] for x in rep["variants"])
            r["max_abs_diff"] = max(x["parity"]["max_abs_diff"] for x in rep["variants"])
            notes = json.dumps(rep)
            r["zero_output_probe"] = "classifier's input" in notes
            r["layers_pruned"] = len(rep["layers"])
    except subprocess.TimeoutExpired:
        r["exit"] = "timeout"
        r["error"] = f"did not finish within {args.timeout} s (shared machine)"
    finally:
        r["seconds"] = round(time.perf_counter() - t0, 1)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        time.sleep(2)  # flock is not fair: let a benchmark waiting for the lock take it before the next model
        shutil.rmtree(tmp, ignore_errors=True)
    return r


def _verdict(r: dict[str, Any]) -> str:
    if r.get("exit") == 0:
        return "ok"
    if r.get("exit") == 2:
        return "exit 2"
    if r.get("exit") == "timeout":
        return "timeout"
    if r.get("exit") is None:
        return "not run"
    return f"**exit {r['exit']}**"


def write_markdown(results: dict[str, dict[str, Any]], order: list[str], meta: dict[str, Any], path: Path | None) -> None:
    done = [results[n] for n in order if "exit" in results.get(n, {})]
    counts: dict[str, int] = {}
    for r in done:
        counts[_verdict(r)] = counts.get(_verdict(r), 0) + 1
    lines = [
        "# Random-init torchvision runs: `deploy-prune run torchvision:NAME --no-finetune`",
        "",
        "<!-- generated by benchmarks/random_init_runs.py; do not edit by hand -->",
        "",
        "Every torchvision classifier, random initialisation (seed 0), through the real command line: L1, ratio "
        f"0.5, no finetuning, input 1x3x{meta['cnn_size']}x{meta['cnn_size']} for CNNs, 96x96 for "
        "Inception-V3/GoogLeNet, 224x224 for the transformers (their position embeddings fix it); "
        f"`--bench-iters {meta['bench_iters']} --provider {meta['provider']} --threads {meta['threads']}`, each run "
        f"holding `flock {LOCK}` (wall time counted from when it had the lock), timeout {meta['timeout']} s, address space capped at {meta['mem_gb']} GB. "
        "The contract: every run ends with exit 0, or exit 2 with a one-line reason.",
        "",
        f"Machine: {meta['machine']}, Python {meta['python']}; {meta.get('conditions') or CONDITIONS} Each "
        "speedup is one interleaved run of 20 iterations. Smallest models first; a model marked *not run* was "
        "not reached in the time the run had.",
        "",
        "Regenerate: `python benchmarks/random_init_runs.py --out docs/random-init.md --json /tmp/random_init.json`",
        "",
        f"**{len(done)} of {len(order)} run**: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ".",
        "",
        "*zero output* = the model's output is identically zero (torchvision zero-initialises ViT's head), so "
        "parity was proven at the classifier's input (an extra graph output of the file, docs/api.md). A wall "
        "time marked * includes the wait for the lock (recorded by an earlier version of this script, whose "
        "report did not yet carry the zero-output note either).",
        "",
        "| model | params | input | result | wall s | structured speedup | MACs dense/structured | parity | note |",
        "|---|---:|---|---|---:|---:|---:|---|---|",
    ]
    for n in order:
        r = results.get(n, {"model": n})
        par = "" if "parity_ok" not in r else ("ok" if r["parity_ok"] else "FAIL") + (
            " (zero output: classifier input)" if r.get("zero_output_probe") else "")
        note = (r.get("error") or "").replace("|", "\\|")
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        secs = f"{r['seconds']}*" if "seconds" in r and "lock_wait_s" not in r else r.get("seconds", "")
        lines.append(f"| {n} | {params} | {r.get('input_shape', '')} | {_verdict(r)} | {secs} | "
                     f"{r.get('speedup', '')} | {r.get('mac_ratio', '')} | {par} | {note} |")
    text = "\n".join(lines) + "\n"
    if path is None:
        print(text)
    else:
        path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset (default: every torchvision classifier)")
    ap.add_argument("--out", type=Path, help="Markdown table (default: stdout)")
    ap.add_argument("--json", type=Path, help="raw results, one object per model")
    ap.add_argument("--update", action="store_true", help="merge into --json's earlier results")
    ap.add_argument("--cnn-size", type=int, default=64)
    ap.add_argument("--bench-iters", type=int, default=20)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--mem-gb", type=float, default=14)
    ap.add_argument("--max-params", type=float, default=0, help="skip models above this many million parameters")
    ap.add_argument("--conditions", default=None, help="what else ran on the machine (printed in --out)")
    ap.add_argument("--render", action="store_true", help="only rewrite --out from --json's results")
    args = ap.parse_args()
    if args.render:
        rows = json.loads(args.json.read_text())
        write_markdown({r["model"]: r for r in rows}, [r["model"] for r in rows], _meta(args), args.out)
        return

    sizes = models_by_size()
    order = [n for n, _ in sizes]
    params = dict(sizes)
    wanted = args.models.split(",") if args.models else order
    if args.max_params:
        wanted = [n for n in wanted if params[n] <= args.max_params * 1e6]
    results: dict[str, dict[str, Any]] = {}
    if args.update and args.json and args.json.exists():
        results = {r["model"]: r for r in json.loads(args.json.read_text())}
    for n in order:
        results.setdefault(n, {"model": n, "params": params[n]})
    meta = _meta(args)
    for n in [m for m in order if m in wanted]:
        r = run_one(n, params[n], args)
        results[n] = r
        print(json.dumps(r), flush=True)
        if args.json:
            args.json.write_text(json.dumps([results[m] for m in order], indent=1))
        write_markdown(results, order, meta, args.out)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    meta = {k: getattr(args, k) for k in ("cnn_size", "bench_iters", "provider", "threads", "timeout", "mem_gb")}
    from deploy_prune.bench import cpu_name

    meta["machine"] = f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores"
    meta["python"] = platform.python_version()
    meta["conditions"] = args.conditions
    return meta


if __name__ == "__main__":
    main()
