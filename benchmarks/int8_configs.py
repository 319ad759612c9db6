"""Which INT8 configuration pays on this CPU: formats, types, reduce_range, per-channel, session options.

Starts from the bundles of ``benchmarks/int8_models.py`` (``WORK/NAME/model.onnx``: the structured fp32 model,
``dense.onnx``), quantizes the structured model (and the dense one, once) with ``deploy_prune.quantize.quantize_onnx``
in several configurations, calibrated on the same train images as the product, then times every file in ONE
interleaved run with the product's protocol (docs/benchmarking.md: sessions created up front, ORT_ENABLE_ALL, spinning
off, blocks of 10 runs with the first 2 dropped, order rotated each round). It also checks the top-1 agreement
of each configuration with fp32 structured on the val split.

    flock /tmp/deploy-prune-bench.lock python benchmarks/int8_configs.py --work /tmp/int8-work \\
        --data /tmp/digits224 --json /tmp/int8-configs.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: F401  # before onnxruntime, as in deploy_prune.bench

import onnxruntime as ort

from deploy_prune.bench import default_threads
from deploy_prune.data import load_data
from deploy_prune.quantize import _calibration_images, choose_reduce_range, cpu_flags, quantize_onnx

# name -> (source: "structured" | "dense", quantize_onnx kwargs or None for the fp32 file, session config entries,
#          graph optimization level)
CONFIGS: dict[str, tuple[str, dict[str, Any] | None, dict[str, str], str]] = {
    "fp32 dense": ("dense", None, {}, "ALL"),
    "fp32 structured": ("structured", None, {}, "ALL"),
    "fp32 structured, denormals as zero": ("structured", None, {"session.set_denormal_as_zero": "1"}, "ALL"),
    "QDQ u8/s8 per-channel (product)": ("structured", {}, {}, "ALL"),
    "QDQ u8/s8 per-channel reduce_range": ("structured", {"reduce_range": True}, {}, "ALL"),
    "QDQ u8/s8 per-tensor": ("structured", {"per_channel": False}, {}, "ALL"),
    "QDQ s8/s8 per-channel": ("structured", {"activation_type": "QInt8"}, {}, "ALL"),
    "QDQ u8/u8 per-channel": ("structured", {"weight_type": "QUInt8"}, {}, "ALL"),
    "QOperator u8/s8 per-channel": ("structured", {"quant_format": "QOperator"}, {}, "ALL"),
    "QDQ product, ORT_ENABLE_EXTENDED": ("structured", {}, {}, "EXTENDED"),
    "QDQ product, QDQ fusion off": ("structured", {}, {"session.disable_quant_qdq": "1"}, "ALL"),
    "QDQ product on dense": ("dense", {}, {}, "ALL"),
}
_LEVELS = {"ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
           "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}


def session(path: Path, threads: int, entries: dict[str, str], level: str) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.graph_optimization_level = _LEVELS[level]
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in entries.items():
        o.add_session_config_entry(k, v)
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray, iters: int, block: int = 10,
                drop: int = 2, warmup: int = 10) -> dict[str, list[float]]:
    feeds = {n: {s.get_inputs()[0].name: x} for n, s in sessions.items()}
    for n, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[n])
    names, kept = list(sessions), {n: [] for n in sessions}
    gc.disable()
    try:
        r = 0
        while any(len(kept[n]) < iters for n in names):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                for i in range(block):
                    t0 = time.perf_counter_ns()
                    sessions[n].run(None, feeds[n])
                    t1 = time.perf_counter_ns()
                    if i >= drop and len(kept[n]) < iters:
                        kept[n].append((t1 - t0) / 1e6)
            r += 1
    finally:
        gc.enable()
    return kept


def top1(s: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: images[i: i + 16]})[0].argmax(1) for i in range(0, len(images), 16)])


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    bundle = args.work / name
    src = {"structured": bundle / "model.onnx", "dense": bundle / "dense.onnx"}
    data = load_data(f"imagefolder:{args.data}", batch_size=16, input_shape=(1, 3, 224, 224))
    calib = _calibration_images(data, args.calib_images, args.seed)
    val = np.concatenate([x.numpy() for x, _ in data.val]).astype(np.float32)
    qdir = args.work / f"{name}-configs"
    qdir.mkdir(exist_ok=True)
    files, settings = {}, {}
    for i, (label, (source, kw, _, _)) in enumerate(CONFIGS.items()):
        if kw is None:
            files[label] = src[source]
            continue
        same = next((l for l, (s2, k2, _, _) in list(CONFIGS.items())[:i] if s2 == source and k2 == kw), None)
        if same is not None:
            files[label] = files[same]
            continue
        path = qdir / f"q{i}.onnx"
        t0 = time.perf_counter()
        kw = {"reduce_range": choose_reduce_range(cpu_flags())[0], **kw}
        try:
            settings[label] = quantize_onnx(src[source], path, calib, calib_method=args.calib_method, **kw)
            files[label] = path
        except Exception as exc:  # noqa: BLE001 - a configuration ORT cannot produce is a result too
            settings[label] = {"error": str(exc)[:200]}
        print(f"  {label}: quantized in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    threads = args.threads or default_threads()
    sessions, errors = {}, {}
    for label, (_, _, entries, level) in CONFIGS.items():
        if label in files:
            try:
                sessions[label] = session(files[label], threads, entries, level)
            except Exception as exc:  # noqa: BLE001
                errors[label] = str(exc).splitlines()[0][:200]
    ref = top1(sessions["fp32 structured"], val)
    agreement = {label: float((top1(s, val) == ref).mean()) for label, s in sessions.items()}
    x = np.random.default_rng(args.seed).standard_normal((1, 3, 224, 224), dtype=np.float32)
    samples = interleaved(sessions, x, args.iters)
    p50 = {label: float(np.median(v)) for label, v in samples.items()}
    return {"model": name, "threads": threads, "p50_ms": p50,
            "vs_structured": {k: p50["fp32 structured"] / v for k, v in p50.items()},
            "top1_agreement": agreement, "bytes": {k: Path(files[k]).stat().st_size for k in sessions},
            "settings": settings, "errors": errors, "iters": args.iters, "onnxruntime": ort.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="int8_models.py's --work folder")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args))
        r = rows[-1]
        print(f"\n### {name} (ORT {r['onnxruntime']}, {r['threads']} threads, {r['iters']} runs each, one "
              "interleaved run)\n")
        print("| configuration | p50 ms | vs fp32 structured | top-1 agreement | file |")
        print("|---|---:|---:|---:|---:|")
        for label in CONFIGS:
            if label in r["p50_ms"]:
                print(f"| {label} | {r['p50_ms'][label]:.2f} | {r['vs_structured'][label]:.2f}x "
                      f"| {100 * r['top1_agreement'][label]:.0f}% | {r['bytes'][label] / 2**20:.2f} MiB |")
            else:
                print(f"| {label} | failed: {r['errors'].get(label) or r['settings'].get(label)} | | | |")
        sys.stdout.flush()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
