"""Dense prediction coverage: torchvision segmentation models and detector backbones, deploy-prune vs Torch-Pruning.

For every torchvision segmentation model (``torchvision:segmentation.NAME``) and a set of detector backbones
(``torchvision:detection.NAME.backbone``: ResNet/MobileNet + FPN, SSD's VGG/MobileNet extractors), random init,
seed 0, L1, ratio 0.5, no finetuning, this script

* runs **deploy-prune's CLI**, ``deploy-prune run SPEC --no-finetune --input-shape ...``, into a temporary
  bundle and reads its report: bundle written (exit 0, report valid against the schema), parity of every
  variant and every output, output names and shapes (the pipeline refuses a variant whose outputs differ),
  MAC ratio, layers left alone;
* prunes the same network (same seed) with **Torch-Pruning 1.6.1** (``MetaPruner`` + ``MagnitudeImportance(p=1)``,
  round_to 8), ignoring the layers that produce the model's outputs (the ones our analysis protects, so both
  keep every output's width), and checks its output names/shapes, MACs and ONNX parity;
* times the bundle's ``dense.onnx`` and ``model.onnx`` and Torch-Pruning's export in ONE interleaved
  ``benchmark()`` call.

Each model runs in its own subprocess (``--one SPEC``) with a wall-clock timeout. Pruning and exporting run
freely; the interleaved timing holds the machine's benchmark lock (``--lock``, ``flock`` semantics via fcntl), so
it never overlaps another job's timing. The CLI's own benchmark runs with 3 iterations only and is not reported
(the table's speedups come from the locked run). After every model the table is
written into ``--out`` between the ``dense-coverage`` markers (the rest of the file is left as it is), and the
raw results into ``--json``.

Example (the command that regenerates the section of docs/coverage.md)::

    python benchmarks/dense_prediction_coverage.py --out docs/coverage.md --json /tmp/dense_coverage.json

Re-run a few models and merge them into the existing results::

    python benchmarks/dense_prediction_coverage.py --models segmentation.fcn_resnet50 --update \\
        --json /tmp/dense_coverage.json --out docs/coverage.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT_TAG = "@@DENSE-COVERAGE-RESULT@@ "
BEGIN, END = "<!-- dense-coverage:begin -->", "<!-- dense-coverage:end -->"
OUTPUT_REASON = "reaches the model's output"

SEGMENTATION = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50",
                "fcn_resnet101", "deeplabv3_resnet101"]
# one backbone per distinct architecture: Faster R-CNN, Mask R-CNN and Keypoint R-CNN share ResNet-50 + FPN with
# LastLevelMaxPool; RetinaNet and FCOS add P6/P7
DETECTION = {"fasterrcnn_mobilenet_v3_large_fpn": 256, "ssdlite320_mobilenet_v3_large": 320,
             "retinanet_resnet50_fpn": 256, "fasterrcnn_resnet50_fpn": 256, "fcos_resnet50_fpn": 256,
             "ssd300_vgg16": 300}
# the order of a full run: cheapest first, so an interrupted run has measured the most models
ORDER = ["segmentation.lraspp_mobilenet_v3_large", "segmentation.deeplabv3_mobilenet_v3_large",
         "segmentation.fcn_resnet50", "segmentation.deeplabv3_resnet50",
         "detection.fasterrcnn_mobilenet_v3_large_fpn.backbone", "detection.ssdlite320_mobilenet_v3_large.backbone",
         "detection.retinanet_resnet50_fpn.backbone", "segmentation.fcn_resnet101", "segmentation.deeplabv3_resnet101",
         "detection.fasterrcnn_resnet50_fpn.backbone", "detection.fcos_resnet50_fpn.backbone",
         "detection.ssd300_vgg16.backbone"]


def default_models(size: int) -> dict[str, int]:
    models = {f"segmentation.{n}": size for n in SEGMENTATION}
    models.update({f"detection.{n}.backbone": s for n, s in DETECTION.items()})
    return {m: models[m] for m in ORDER}


# ----------------------------------------------------------------------------------------------------------
# one model (child process)


def run_one(spec: str, hw: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    import compare_torch_pruning as C
    from deploy_prune.bench import benchmark
    from deploy_prune.cli.main import main as cli
    from deploy_prune.export import cleanup_onnx, export_onnx, parity
    from deploy_prune.loading import load_model
    from deploy_prune.metrics import count_macs, count_params
    from deploy_prune.outputs import output_shapes

    torch.set_num_threads(args.threads)
    shape = (1, 3, hw, hw)
    r: dict[str, Any] = {"model": spec, "input_shape": list(shape), "errors": {}, "ours": {}, "tp": {},
                         "timings_s": {}}
    tick = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        r["timings_s"][what] = round(now - tick, 1)
        tick = now

    def fail(stage: str, exc: BaseException) -> None:
        r["errors"][stage] = C.one_line(exc)
        print(f"--- {stage} failed ---", file=sys.stderr)
        traceback.print_exc()

    with tempfile.TemporaryDirectory(prefix="dense-cov-") as tmp:
        bundle = Path(tmp) / "bundle"
        argv = ["run", f"torchvision:{spec}", "--no-finetune", "--input-shape", "x".join(map(str, shape)),
                "--bench-iters", "3", "--threads", str(args.threads), "--provider", args.provider,
                "--out", str(bundle), "-q"]
        r["command"] = "deploy-prune " + " ".join(shlex.quote(a) for a in argv)
        try:
            cli(argv)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        r["ours"]["exit_code"] = code
        lap("ours: deploy-prune run")
        o = r["ours"]
        if code == 0:
            rep = json.loads((bundle / "report.json").read_text())
            v = {x["kind"]: x for x in rep["variants"]}
            o["bundle"] = True
            o["outputs"] = rep.get("outputs")
            o["parity"] = {k: x["parity"] for k, x in v.items()}
            o["parity_ok"] = all(x["parity"]["ok"] for x in v.values())
            o["macs"], r["dense_macs"] = v["structured"]["macs"], v["dense"]["macs"]
            o["mac_ratio"] = v["dense"]["macs"] / v["structured"]["macs"]
            o["params"], r["dense_params"] = v["structured"]["params"], v["dense"]["params"]
            o["cli_speedup"] = v["structured"]["speedup_vs_dense"]
            o["layers_pruned"] = len(rep["layers"])
            o["left_alone"] = {k: why for k, why in rep.get("skipped_layers", {}).items() if why != OUTPUT_REASON}
            o["protected_outputs"] = [k for k, why in rep.get("skipped_layers", {}).items() if why == OUTPUT_REASON]
            o["notes"] = [n for n in rep.get("notes", []) if "parity" in n]
            o["ok"] = bool(o["parity_ok"] and o["mac_ratio"] > 1)

        # Torch-Pruning on the same network (same seed), protecting the layers that produce the outputs
        t = r["tp"]
        loaded = load_model(f"torchvision:{spec}", seed=0)
        dense = loaded.model.eval()
        example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            dense_out = output_shapes(dense(example))
        r["dense_outputs"] = dense_out
        tp_model = copy.deepcopy(dense)
        try:
            protected = o.get("protected_outputs") or []
            ignored = [tp_model.get_submodule(n) for n in protected]
            t["ignored_layers"] = protected
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner = tp.pruner.MetaPruner(tp_model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                              pruning_ratio=args.ratio, ignored_layers=ignored, round_to=8)
                pruner.step()
            tp_model.eval()
            t["seconds"] = round(time.perf_counter() - t0, 1)
            t["pruned"] = count_params(tp_model) < count_params(dense)
            with torch.no_grad():
                t["outputs"] = output_shapes(tp_model(example))
            t["same_outputs"] = t["outputs"] == dense_out
            t["macs"] = count_macs(tp_model, shape)
            t["mac_ratio"] = count_macs(dense, shape) / t["macs"]
        except Exception as exc:  # noqa: BLE001
            fail("tp prune", exc)
            t["pruned"] = False
        lap("tp prune")
        files = {}
        if code == 0:
            files = {"dense": bundle / "dense.onnx", "ours": bundle / "model.onnx"}
        if t.get("pruned") and t.get("same_outputs"):
            try:
                raw, clean = Path(tmp) / "tp.raw.onnx", Path(tmp) / "tp.onnx"
                export_onnx(tp_model, raw, example)
                cleanup_onnx(raw, clean)
                p = parity(clean, tp_model, [example, torch.randn(2, *shape[1:])])
                t["parity"] = {"ok": p["ok"], "max_rel_diff": p["max_rel_diff"], "note": p["note"]}
                if p["ok"]:
                    files["tp"] = clean
            except Exception as exc:  # noqa: BLE001
                fail("tp export", exc)
        t["ok"] = bool(t.get("pruned") and t.get("same_outputs") and (t.get("parity") or {}).get("ok"))
        lap("tp export")
        del dense, tp_model
        if "dense" in files and len(files) > 1:
            try:
                lock = _locked(args.lock)
                r["lock_wait_s"] = round(time.perf_counter() - tick, 1)
                r["loadavg_before_bench"] = [round(x, 2) for x in os.getloadavg()]
                with lock:
                    res = benchmark(files, shape, provider=args.provider, threads=args.threads, iters=args.bench_iters,
                                    progress=False)
                r["bench"] = {"provider": res.provider, "threads": res.threads, "iters": args.bench_iters}
                r["dense_p50_ms"] = res.stats["dense"].p50
                for kind in ("ours", "tp"):
                    if kind in res.stats:
                        r[kind]["p50_ms"] = res.stats[kind].p50
                        r[kind]["speedup"] = res.stats["dense"].p50 / res.stats[kind].p50
            except Exception as exc:  # noqa: BLE001
                fail("benchmark", exc)
            lap("benchmark")
    return r


class _Held:
    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _locked(path: str) -> _Held:
    """Wait for the benchmark lock at ``path`` (the same lock ``flock PATH cmd`` takes); '' for none."""
    if not path:
        return _Held(None)
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return _Held(fd)


def child_main(args: argparse.Namespace) -> int:
    try:
        r = run_one(args.one, args.size, args)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        import compare_torch_pruning as C

        r = {"model": args.one, "crash": C.one_line(exc)}
    sys.stdout.write(RESULT_TAG + json.dumps(r, default=str) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------
# parent


def run_child(spec: str, hw: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", spec, "--size", str(hw), "--ratio",
           str(args.ratio), "--bench-iters", str(args.bench_iters), "--provider", args.provider, "--threads",
           str(args.threads), "--lock", args.lock]
    log = log_dir / f"{spec}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                 start_new_session=True) as proc:
        try:
            stdout, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started (its own session)
            proc.communicate()
            return {"model": spec, "crash": f"timeout after {args.timeout} s (lock wait included)",
                    "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            r["wall_s"] = wall
            return r
    import torchvision_coverage as TV

    return {"model": spec, "crash": f"exit code {proc.returncode}: {TV._tail(log)}", "wall_s": wall}


def _outputs(outs: list[dict[str, Any]] | None) -> str:
    if not outs:
        return "—"
    shapes = ["x".join(map(str, o["shape"][1:])) for o in outs]
    if len(outs) > 2 and len(set(o["shape"][1] for o in outs)) == 1:
        return f"{len(outs)} maps ({', '.join(o['name'] for o in outs)}), {outs[0]['shape'][1]} ch"
    return ", ".join(f"`{o['name']}` {s}" for o, s in zip(outs, shapes))


def _row(r: dict[str, Any]) -> str:
    import compare_torch_pruning as C

    name = f"`{r['model']}`"
    if "crash" in r:
        return f"| {name} | — | — | **crash**: {r['crash'][:120]} | — | — | — | — | — | — | — |"
    o, t = r["ours"], r["tp"]
    hw = r["input_shape"][-1]
    if o.get("bundle"):
        bad = [k for k, p in o["parity"].items() if not p["ok"]]
        par = "ok (all variants, every output)" if not bad else f"**FAIL** ({', '.join(bad)})"
        ours = [par, C.fmt_x(o.get("mac_ratio")), C.fmt_x(o.get("speedup")), str(len(o.get("left_alone") or {}))]
    else:
        ours = [f"**exit {o.get('exit_code')}**", "—", "—", "—"]
    if t.get("pruned") is False and "tp prune" in r["errors"]:
        tps = ["**error**", "—", "—", r["errors"]["tp prune"][:100].replace("|", "/")]
    else:
        same = "same" if t.get("same_outputs") else "**changed**"
        tpar = (t.get("parity") or {})
        err = "" if tpar.get("ok", True) else "ONNX parity fails"
        err = "; ".join(x for x in (err, *(v[:80] for k, v in r["errors"].items() if k.startswith("tp"))) if x)
        tps = [same, C.fmt_x(t.get("mac_ratio")), C.fmt_x(t.get("speedup")), err.replace("|", "/")]
    return "| " + " | ".join([name, str(hw), _outputs(r.get("dense_outputs")), *ours, *tps]) + " |"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    import compare_torch_pruning as C

    env = meta["environment"]
    ok = [r for r in results if (r.get("ours") or {}).get("ok")]
    tp_ok = [r for r in results if (r.get("tp") or {}).get("ok")]
    both = [r for r in results if (r.get("ours") or {}).get("speedup") and (r.get("tp") or {}).get("speedup")]
    out = [
        BEGIN,
        "",
        "## Segmentation models and detector backbones (dense prediction)",
        "",
        "<!-- generated by benchmarks/dense_prediction_coverage.py; do not edit by hand -->",
        "",
        f"Regenerate: `{meta['command']}`" + (f" (rows last re-run with `{meta['last_command']}`)"
                                             if meta.get("last_command") else ""),
        "",
        f"- Date: {env['date']}; machine: {env['cpu']}, {env['cores']} cores — a **shared, loaded 2-core VM** "
        "(other jobs ran beside it; the benchmark lock only keeps benchmarks apart): absolute times are inflated, "
        "ratios come from one interleaved run per model and carry about ±10% noise.",
        f"- Versions: torch {env['torch']}, torchvision {env['torchvision']}, onnxruntime {env['onnxruntime']}, "
        f"torch-pruning {env['torch-pruning']}; ONNX Runtime {meta['provider']}, {meta['threads']} intra-op "
        f"threads, {meta['bench_iters']} kept runs per variant.",
        f"- **ours** = `deploy-prune run torchvision:SPEC --no-finetune --input-shape 1x3xHxW` (L1, ratio "
        f"{meta['ratio']}, default round-to, random init seed 0): the bundle's dense.onnx and model.onnx. "
        "**TP** = Torch-Pruning `MetaPruner` + `MagnitudeImportance(p=1)`, round_to 8, ignoring the layers that "
        "produce the outputs (those our analysis protects, so both keep every output's width). Dense, ours and "
        "TP are timed in one interleaved `benchmark()` call per model.",
        "- Random init: the MobileNetV3 and SSD feature extractors' activations shrink layer after layer (max "
        "|y| 1e-8 to 1e-26 at their outputs, no weight is zero-initialised); parity is judged relative to each "
        "output's own scale (the report says so in its notes), and an output that is identically zero fails.",
        "",
        f"**deploy-prune: {len(ok)}/{len(results)} models give a valid bundle with parity ok on every output and "
        f"fewer MACs; Torch-Pruning 1.6.1: {len(tp_ok)}/{len(results)} pruned with the same outputs and ONNX "
        "parity ok.**" + (f" Ours' ORT speedup / TP's where both ran: median "
                          f"{statistics.median(r['ours']['speedup'] / r['tp']['speedup'] for r in both):.2f}."
                          if both else ""),
        "",
        "| model (torchvision:…) | input | outputs (per image) | ours: parity | ours: MACs ÷ | ours: speedup "
        "| ours: layers left alone | TP: outputs | TP: MACs ÷ | TP: speedup | TP: error |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    out += [_row(r) for r in results]
    missing = [m for m in ORDER if m not in {r["model"] for r in results}]
    if missing:
        out += ["", f"Not timed in this run (stopped for time on the shared machine): "
                    f"{', '.join(f'`{m}`' for m in missing)}. The ResNet-50/101 segmentation models among them "
                    "were run through `deploy-prune run` without timing (valid bundle, parity ok, MACs in "
                    "docs/dense-prediction.md)."]
    notes = []
    for r in results:
        for k, why in ((r.get("ours") or {}).get("left_alone") or {}).items():
            notes.append(f"- {r['model']} (ours) left `{k}` alone: {why}")
        said = set()
        for n in (r.get("ours") or {}).get("notes") or []:
            text = n.split(": ", 1)[-1].split(" (max|y|")[0]  # one line per kind of note, not per variant
            if text not in said:
                said.add(text)
                notes.append(f"- {r['model']} (ours): {n}")
        if "crash" not in r:
            wall = r.get("wall_s")
            notes.append(f"- {r['model']}: {r.get('wall_s', '—')} s wall in all ({r.get('lock_wait_s', '—')} s "
                         f"waiting for the benchmark lock), dense p50 {C.fmt_ms(r.get('dense_p50_ms'))} ms, load "
                         f"average before timing {r.get('loadavg_before_bench', '—')}" if wall else "")
    notes = [n for n in notes if n]
    if notes:
        out += ["", "### Notes", "", *notes]
    out += ["", END]
    return "\n".join(out) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of ``path`` (between the markers), or append it."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def parent_main(args: argparse.Namespace) -> int:
    import compare_torch_pruning as C

    models = default_models(args.size)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        models = {m: models.get(m, args.size) for m in wanted}
    results: dict[str, dict[str, Any]] = {}
    meta = {"command": C.command_line(), "environment": C.environment(), "ratio": args.ratio,
            "bench_iters": args.bench_iters, "provider": args.provider, "threads": args.threads}
    if args.update and args.json and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        results = {r["model"]: r for r in old["results"]}
        meta["last_command"], meta["command"] = meta["command"], old["meta"]["command"]
    log_dir = Path(tempfile.mkdtemp(prefix="dense-cov-logs-"))
    print(f"logs in {log_dir}", file=sys.stderr)
    order = list(default_models(args.size))
    for spec, hw in models.items():
        t0 = time.perf_counter()
        r = run_child(spec, hw, args, log_dir)
        results[spec] = r
        o = r.get("ours") or {}
        print(f"{spec}: ours ok={o.get('ok')} macs÷{o.get('mac_ratio')} speedup {o.get('speedup')}; "
              f"tp ok={(r.get('tp') or {}).get('ok')} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        rows = sorted(results.values(), key=lambda x: order.index(x["model"]) if x["model"] in order else 99)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
        if args.out:
            write_section(Path(args.out), markdown(rows, meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated specs after torchvision: (default: all listed in the script)")
    ap.add_argument("--size", type=int, default=256, help="input height/width for segmentation and R-CNN/RetinaNet/"
                                                          "FCOS backbones (SSDs use their own)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--bench-iters", type=int, default=30)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per model, lock wait included")
    ap.add_argument("--lock", default="/tmp/deploy-prune-bench.lock",
                    help="the benchmark lock each model's timing holds ('' for none)")
    ap.add_argument("--out", help="Markdown file whose dense-coverage section is (re)written")
    ap.add_argument("--json", help="raw results")
    ap.add_argument("--update", action="store_true", help="merge into the results already in --json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
