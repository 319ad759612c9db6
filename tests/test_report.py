"""Report validation, the verdict line, and writing report.json / report.md / plots from a real benchmark."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy_prune.bench import BenchResult, benchmark
from deploy_prune.errors import DeployPruneError
from deploy_prune.report import validate_report, verdict, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def conv_model(path: Path, channels: int) -> Path:
    """A Conv(3→C)-Relu-GlobalAveragePool model on [batch, 3, 16, 16], written at IR 10 / opset 18."""
    rng = np.random.default_rng(channels)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["logits"]),
        ],
        f"conv{channels}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels, 1, 1])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> BenchResult:
    """A real (tiny) benchmark of three ONNX files keyed by variant kind."""
    d = tmp_path_factory.mktemp("variants")
    files = {
        "dense": conv_model(d / "dense.onnx", 16),
        "unstructured": conv_model(d / "unstructured.onnx", 16),
        "structured": conv_model(d / "model.onnx", 8),
    }
    return benchmark(files, (1, 3, 16, 16), iters=8, warmup=1, block=4, drop=1, threads=1, progress=False)


def make_report(bench: BenchResult, *, n_layers: int = 2) -> dict[str, Any]:
    """A well-formed v1 report whose latencies come from ``bench``."""
    sizes = {"dense": (2800, 2800, 400_000), "unstructured": (2800, 1000, 400_000), "structured": (1000, 1000, 110_000)}
    onnx_names = {"dense": "dense.onnx", "unstructured": "unstructured.onnx", "structured": "model.onnx"}
    speedups = bench.speedups("dense")
    variants = [
        {
            "kind": kind,
            "onnx": onnx_names[kind],
            "params": sizes[kind][0],
            "nonzero_params": sizes[kind][1],
            "macs": sizes[kind][2],
            "onnx_bytes": 4 * sizes[kind][0] + 600,
            "latency_ms": bench.stats[kind].to_dict(),
            "speedup_vs_dense": speedups[kind],
            "accuracy": None,
            "parity": {"max_abs_diff": 1.2e-7, "ok": True},
        }
        for kind in ("dense", "unstructured", "structured")
    ]
    layers = [
        {"name": f"features.{i}.conv", "out_channels_before": 16, "out_channels_after": 8, "kept": list(range(8))}
        for i in range(n_layers)
    ]
    return {
        "schema_version": 1,
        "model": "builtin:tiny",
        "criterion": "l1",
        "ratio": 0.5,
        "input_shape": [1, 3, 16, 16],
        "environment": {
            "provider": bench.provider,
            "onnxruntime": bench.onnxruntime,
            "torch": "2.14.1",
            "intra_op_threads": bench.threads,
        },
        "variants": variants,
        "layers": layers,
    }


def test_validate_accepts_well_formed_report(bench: BenchResult) -> None:
    report = make_report(bench)
    report["notes"] = ["extra keys are allowed"]
    validate_report(report)


def test_validate_rejects_missing_variants(bench: BenchResult) -> None:
    report = make_report(bench)
    del report["variants"]
    with pytest.raises(DeployPruneError, match="'variants' is a required property"):
        validate_report(report)


def test_validate_rejects_bad_values_and_duplicate_kinds(bench: BenchResult) -> None:
    report = make_report(bench)
    report["variants"][0]["params"] = -1
    with pytest.raises(DeployPruneError, match="variants/0/params"):
        validate_report(report)
    report = make_report(bench)
    report["variants"][1]["kind"] = "dense"
    with pytest.raises(DeployPruneError, match="exactly one each"):
        validate_report(report)


def _with_speedups(report: dict[str, Any], structured: float, unstructured: float) -> dict[str, Any]:
    r = copy.deepcopy(report)
    by_kind = {v["kind"]: v for v in r["variants"]}
    by_kind["structured"]["speedup_vs_dense"] = structured
    by_kind["unstructured"]["speedup_vs_dense"] = unstructured
    by_kind["structured"]["macs"] = 108_000  # 27% of dense
    return r


def test_verdict_sentences(bench: BenchResult) -> None:
    report = make_report(bench)
    line = verdict(_with_speedups(report, 3.7, 1.01))
    assert line.startswith("structured: 3.7x faster at 27% of the MACs")
    assert "unstructured at the same non-zero count: 1.0x — dense kernels do not skip zeros" in line
    assert "no measurable speedup" in verdict(_with_speedups(report, 1.02, 0.99))

    failed = _with_speedups(report, 2.0, 1.0)
    failed["variants"][2]["parity"]["ok"] = False
    assert "WARNING: ONNX parity failed for structured" in verdict(failed)

    with_acc = _with_speedups(report, 2.0, 1.0)
    for v in with_acc["variants"]:
        v["accuracy"] = 90.0 if v["kind"] != "structured" else 87.5  # top-1 %
    assert "accuracy 90.00% → 87.50%" in verdict(with_acc)


def test_write_report_bundle(bench: BenchResult, tmp_path: Path) -> None:
    report = make_report(bench, n_layers=45)
    original = copy.deepcopy(report)
    (tmp_path / "gamma.png").write_bytes(PNG_MAGIC)  # an extra plot made elsewhere
    cleanup = {"nodes_before": 9, "nodes_after": 7, "op_counts_before": {"Identity": 2, "Conv": 7},
               "op_counts_after": {"Conv": 7}}
    extras = {
        "cleanup": {"structured": cleanup},
        "skipped_layers": {"head.fc": "feeds the model output"},
        "notes": ["accuracy is unknown: no --data"],
        "plots": ["gamma.png"],
    }
    written = write_report(tmp_path, report, bench, extras)

    names = {p.name for p in written}
    assert {"report.json", "report.md", "latency.png", "latency_vs_macs.png", "latency_samples.json"} <= names
    assert all(p.exists() for p in written)
    for png in ("latency.png", "latency_vs_macs.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert report == original  # the caller's dict is not modified

    saved = json.loads((tmp_path / "report.json").read_text())
    validate_report(saved)
    assert saved["verdict"] == verdict(report)
    assert saved["bench"]["method"] == bench.method
    assert saved["cleanup"] == extras["cleanup"]
    samples = json.loads((tmp_path / "latency_samples.json").read_text())
    assert {k: len(v) for k, v in samples["samples"].items()} == {"dense": 8, "unstructured": 8, "structured": 8}

    md = (tmp_path / "report.md").read_text()
    assert verdict(report) in md
    for kind in ("dense", "unstructured", "structured"):
        assert f"| {kind} |" in md
    assert "unknown (no --data)" in md
    assert "| structured | 9 | 7 | Identity 2→0 |" in md
    assert "Showing the first 40 of 45 layers" in md
    assert md.count("| `features.") == 40
    assert "`head.fc` | feeds the model output" in md
    assert "![latency](latency.png)" in md and "![gamma](gamma.png)" in md
    assert bench.method in md and bench.provider in md
    assert "## How to read this report" in md


def test_write_report_refuses_invalid_report_and_writes_nothing(bench: BenchResult, tmp_path: Path) -> None:
    report = make_report(bench)
    report["criterion"] = "magic"
    out = tmp_path / "bundle"
    with pytest.raises(DeployPruneError, match="criterion"):
        write_report(out, report, bench, {})
    assert not out.exists()
