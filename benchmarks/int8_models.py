"""INT8 on top of structured pruning, measured as a user runs it: ``deploy-prune run ... --int8``.

For every model, a 10-class torchvision checkpoint (random init, seeded; no weights are downloaded) is saved as
``{"arch", "state_dict"}`` and run through the product as a subprocess::

    deploy-prune run CKPT --data imagefolder:DIR --int8 --no-finetune --input-shape 1x3x224x224 ...

so dense fp32, structured fp32 and int8 (the structured model quantized by ONNX Runtime) are timed in the
product's ONE interleaved benchmark. The table reports their p50s and ratios, the top-1 agreement of int8 with
fp32 structured on the val split, the file sizes and the quantization settings the product chose.

Random-init networks have near-tied logits, so their top-1 agreement says little about a trained model's; the
run therefore passes ``--int8-min-agreement 0`` (speed is what is measured here; the digits acceptance test
checks agreement on a trained model).

Make the image folder first and hold the benchmark lock, so no other timing overlaps::

    python benchmarks/make_image_folder.py /tmp/digits224 --train 20 --val 10
    flock /tmp/deploy-prune-bench.lock python benchmarks/int8_models.py --data /tmp/digits224 --json /tmp/int8.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("resnet18", "mobilenet_v2")


def checkpoint(name: str, path: Path, seed: int) -> None:
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10)
    torch.save({"arch": f"torchvision:{name}", "num_classes": 10, "state_dict": model.state_dict()}, path)


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ckpt = work / f"{name}_10cls.pt"
    checkpoint(name, ckpt, args.seed)
    out = work / name
    cmd = [sys.executable, "-m", "deploy_prune", "run", str(ckpt), "--data", f"imagefolder:{args.data}", "--int8",
           "--no-finetune", "--input-shape", "1x3x224x224", "--ratio", str(args.ratio), "--bench-iters",
           str(args.bench_iters), "--calib-method", args.calib_method, "--int8-min-agreement", "0",
           "--seed", str(args.seed), "--out", str(out), "--force", "-q"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shown = " ".join(["deploy-prune", *cmd[3:]]).replace(str(work), "$WORK").replace(str(args.data), "DIR")
    if proc.returncode != 0:
        return {"model": name, "exit": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:],
                "command": shown}
    rep = json.loads((out / "report.json").read_text())
    v = {x["kind"]: x for x in rep["variants"]}
    d, s, q = v["dense"], v["structured"], v["int8"]
    det = rep["variant_details"]["int8"]
    return {
        "model": name, "exit": 0, "wall_s": round(wall, 1), "command": shown,
        "p50_ms": {k: round(v[k]["latency_ms"]["p50"], 3) for k in v},
        "p90_ms": {k: round(v[k]["latency_ms"]["p90"], 3) for k in v},
        "int8_vs_structured": round(s["latency_ms"]["p50"] / q["latency_ms"]["p50"], 3),
        "int8_vs_dense": round(d["latency_ms"]["p50"] / q["latency_ms"]["p50"], 3),
        "structured_vs_dense": round(d["latency_ms"]["p50"] / s["latency_ms"]["p50"], 3),
        "macs": {k: v[k]["macs"] for k in v}, "onnx_bytes": {k: v[k]["onnx_bytes"] for k in v},
        "accuracy": {k: v[k]["accuracy"] for k in v}, "top1_agreement": q["parity"]["top1_agreement"],
        "max_abs_diff": q["parity"]["max_abs_diff"], "quantization": det["quantization"],
        "environment": rep["environment"], "bench_method": rep["bench"].get("method"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | dense fp32 p50 | structured fp32 p50 | int8 p50 | structured ÷ dense | int8 vs structured "
             "| int8 vs dense | top-1 agreement | int8 file / fp32 structured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("exit"):
            lines.append(f"| {r['model']} | failed: {r.get('error')} | | | | | | | |")
            continue
        p = r["p50_ms"]
        lines.append(f"| {r['model']} | {p['dense']:.2f} ms | {p['structured']:.2f} ms | {p['int8']:.2f} ms "
                     f"| {r['structured_vs_dense']:.2f}x | {r['int8_vs_structured']:.2f}x | {r['int8_vs_dense']:.2f}x "
                     f"| {100 * r['top1_agreement']:.0f}% | {r['onnx_bytes']['int8'] / r['onnx_bytes']['structured']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an image folder (benchmarks/make_image_folder.py)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--bench-iters", type=int, default=200)
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the bundles here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.data = args.data.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="int8-models."))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args, work))
        print(json.dumps({k: rows[-1].get(k) for k in ("model", "exit", "p50_ms", "int8_vs_structured",
                                                           "top1_agreement", "error")}), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows},
                                        indent=2))
    print(f"bundles in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
