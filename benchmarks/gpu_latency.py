"""Dense vs structured vs unstructured latency on a GPU: ONNX Runtime's CUDA provider and PyTorch CUDA.

For every model (torchvision, random init, seed 0; latency does not depend on the weights' values):

* **structured**: deploy-prune's L1 channel surgery at ``--ratio`` (``round_to`` 8), no finetuning;
* **unstructured**: the dense model with its smallest-magnitude conv/linear weights zeroed until it holds the
  *same number of non-zero weights* as the structured model (what the pipeline's unstructured twin does);
* each variant is exported with deploy-prune's exporter, cleaned with onnx-graphsurgeon and checked against
  PyTorch on the CUDA provider (TF32 off for the check), then timed:

  - ONNX Runtime CUDA EP: deploy-prune's ``benchmark()`` (IOBinding, one interleaved run for the three
    variants, provider defaults otherwise, TF32 on as shipped);
  - PyTorch CUDA (eager, fp32, ``torch.inference_mode``, cuDNN defaults): the three variants interleaved in
    blocks, each call bracketed by ``torch.cuda.synchronize()``.

Results go to ``--out`` as ``gpu_latency.json`` and ``gpu_latency.md``. The script stops starting new models
after ``--budget-s`` seconds, so it ends inside a fixed lease.

Example (as run on the lent GPU machine; see docs/benchmarks.md)::

    python benchmarks/gpu_latency.py --out /tmp/gpu --models resnet18,resnet50 --batches 1,32
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

KINDS = ("dense", "structured", "unstructured")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "onnx": onnx.__version__, "onnxruntime": ort.__version__,
           "ort_providers": ",".join(ort.get_available_providers())}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def build_variants(name: str, ratio: float, shape: tuple[int, ...]) -> tuple[dict[str, torch.nn.Module], dict]:
    import torchvision

    from deploy_prune.criteria import ScoreContext, create
    from deploy_prune.metrics import count_macs, count_nonzero, count_params
    from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select
    from deploy_prune.unstructured import unstructured_like

    torch.manual_seed(0)
    dense = torchvision.models.get_model(name).eval()
    structured = copy.deepcopy(dense)
    graph = analyze(structured, shape)
    crit = create("l1")
    crit.prepare(structured, graph, ScoreContext(seed=0))
    prune_channels(structured, graph, select(graph, crit, PlanConfig(ratio=ratio, round_to=8)))
    unstructured = unstructured_like(copy.deepcopy(dense), count_nonzero(structured))
    variants = {"dense": dense, "structured": structured.eval(), "unstructured": unstructured.eval()}
    info = {k: {"params": count_params(m), "nonzero": count_nonzero(m), "macs": count_macs(m, shape)}
            for k, m in variants.items()}
    return variants, info


def torch_latency(models: dict[str, torch.nn.Module], shape: tuple[int, ...], iters: int, block: int = 10,
                  warmup: int = 10) -> dict[str, dict[str, float]]:
    """p50/mean ms per variant on CUDA, interleaved in blocks (the first 2 runs of each block dropped)."""
    dev = torch.device("cuda")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dev)
    cuda_models = {k: m.to(dev) for k, m in models.items()}
    samples: dict[str, list[float]] = {k: [] for k in cuda_models}
    with torch.inference_mode():
        for m in cuda_models.values():
            for _ in range(warmup):
                m(x)
        torch.cuda.synchronize()
        while min(len(v) for v in samples.values()) < iters:
            for k, m in cuda_models.items():
                for i in range(block):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter_ns()
                    m(x)
                    torch.cuda.synchronize()
                    if i >= 2 and len(samples[k]) < iters:
                        samples[k].append((time.perf_counter_ns() - t0) / 1e6)
    for m in cuda_models.values():
        m.cpu()
    return {k: {"p50": statistics.median(v), "mean": statistics.fmean(v), "min": min(v), "n": len(v)}
            for k, v in samples.items()}


def run_model(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from deploy_prune.bench import benchmark
    from deploy_prune.export import cleanup_onnx, export_onnx, parity

    hw = 224
    shape = (1, 3, hw, hw)
    row: dict[str, Any] = {"model": name, "ratio": args.ratio, "errors": {}}
    t0 = time.time()
    variants, row["variants"] = build_variants(name, args.ratio, shape)
    files: dict[str, Path] = {}
    check = [torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(1))]
    for kind, m in variants.items():
        raw, clean = tmp / f"{name}.{kind}.raw.onnx", tmp / f"{name}.{kind}.onnx"
        export_onnx(m, raw, torch.randn(*shape))
        cleanup_onnx(raw, clean)
        files[kind] = clean
        p = parity(clean, m, check, provider=args.provider)
        row["variants"][kind]["parity_ok"] = bool(p["ok"])
        row["variants"][kind]["parity_max_rel_diff"] = float(p["max_rel_diff"])
    row["export_s"] = round(time.time() - t0, 1)
    row["ort"], row["torch"] = {}, {}
    for b in args.batches:
        bshape = (b, 3, hw, hw)
        try:
            res = benchmark(files, bshape, provider=args.provider, iters=args.iters, seed=0, progress=False)
            row["ort"][f"b{b}"] = {k: {"p50": s.p50, "mean": s.mean, "min": s.min, "n": s.n}
                                  for k, s in res.stats.items()}
            row["ort_provider"] = res.provider
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["errors"][f"ort b{b}"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        if torch.cuda.is_available():
            try:
                row["torch"][f"b{b}"] = torch_latency(variants, bshape, args.iters)
            except Exception as exc:  # noqa: BLE001
                row["errors"][f"torch b{b}"] = f"{type(exc).__name__}: {exc}"[:300]
                traceback.print_exc()
    row["seconds"] = round(time.time() - t0, 1)
    return row


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Device: {meta['versions'].get('gpu', 'no GPU')}; provider {meta.get('provider')}; "
             f"versions {json.dumps(meta['versions'])}", "",
             "| model | batch | MACs dense→structured | ORT p50 ms dense | structured | unstructured | ORT speedup "
             "structured | unstructured | torch p50 ms dense | structured | unstructured | torch speedup "
             "structured | unstructured | parity |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "variants" not in r:
            lines.append(f"| {r['model']} | | | | | | | | | | | | | failed: {r.get('error', '')[:80]} |")
            continue
        v = r["variants"]
        macs = f"{v['dense']['macs'] / 1e6:.0f}M→{v['structured']['macs'] / 1e6:.0f}M"
        par = "ok" if all(v[k].get("parity_ok") for k in KINDS) else "FAIL"
        for b in sorted({*r.get("ort", {}), *r.get("torch", {})}, key=lambda s: int(s[1:])):
            o, t = r.get("ort", {}).get(b), r.get("torch", {}).get(b)

            def cells(d: dict | None) -> list[str]:
                if not d:
                    return ["–"] * 5
                base = d["dense"]["p50"]
                return [f"{d[k]['p50']:.3f}" for k in KINDS] + [f"{base / d[k]['p50']:.2f}x"
                                                                for k in ("structured", "unstructured")]

            lines.append("| " + " | ".join([r["model"], b[1:], macs, *cells(o), *cells(t), par]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,resnext50_32x4d")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--provider", default="cuda", help="cuda (default) or cpu, for a dry run without a GPU")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no new model after this many seconds")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"versions": _versions(), "argv": sys.argv, "provider": args.provider,
                            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if time.time() - start > args.budget_s:
                rows.append({"model": name, "error": "skipped: time budget spent"})
                continue
            try:
                rows.append(run_model(name, args, Path(tmp)))
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            meta["provider_used"] = rows[-1].get("ort_provider")
            (args.out / "gpu_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            (args.out / "gpu_latency.md").write_text(render(rows, meta))
            print(f"[{time.time() - start:.0f}s] {name} done", flush=True)
    print(render(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
