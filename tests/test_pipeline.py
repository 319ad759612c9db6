"""End-to-end runs of the pipeline on the embedded models and data (real exporter, graphsurgeon, ORT)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
import torch

from deploy_prune.cli.main import main
from deploy_prune.errors import BadInput
from deploy_prune.loading import load_model

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "deploy_prune" / "report.schema.json").read_text())


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0)


def _check_bundle(out: Path) -> dict:
    for name in ("model.onnx", "dense.onnx", "unstructured.onnx", "pruned.pt", "report.json", "report.md",
                 "latency.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.onnx.data"))
    report = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    kinds = [v["kind"] for v in report["variants"]]
    assert sorted(kinds) == ["dense", "structured", "unstructured"]
    v = {x["kind"]: x for x in report["variants"]}
    assert all(x["parity"]["ok"] for x in v.values())
    assert abs(v["unstructured"]["nonzero_params"] - v["structured"]["nonzero_params"]) <= \
        0.01 * v["structured"]["nonzero_params"]
    assert v["unstructured"]["params"] == v["dense"]["params"]
    assert v["structured"]["params"] < v["dense"]["params"]
    assert v["structured"]["macs"] < v["dense"]["macs"]
    from deploy_prune.bench import resolve_provider

    assert report["environment"]["provider"] == resolve_provider("auto")  # what really ran: CPU here, CUDA on a GPU
    for layer in report["layers"]:
        kept = layer["kept"]
        assert kept == sorted(set(kept)) and len(kept) == layer["out_channels_after"]
        assert layer["out_channels_after"] < layer["out_channels_before"]
        assert max(kept) < layer["out_channels_before"]
    md = (out / "report.md").read_text()
    assert report["verdict"] in md
    # the control pair: the sparse copy runs dense's kernels; the variants' numbers come from the run kept
    control = report["bench"]["control"]
    assert control["pair"] == ["dense", "unstructured"] and 1 <= len(control["runs"]) <= 3
    kept = control["runs"][control["kept"]]
    p50 = {kind: x["latency_ms"]["p50"] for kind, x in v.items()}
    assert kept["control_ratio"] == pytest.approx(p50["unstructured"] / p50["dense"], abs=1e-3)
    assert kept["speedups"]["structured"] == pytest.approx(v["structured"]["speedup_vs_dense"], abs=1e-3)
    assert "Control: unstructured runs dense's kernels" in md
    # and every speedup read round by round too, which report.md shows beside the p50s' ratio
    assert set(kept["paired_speedups"]) == {"unstructured", "structured"}
    assert f"structured {kept['speedups']['structured']:.3f}x / {kept['paired_speedups']['structured']:.3f}x" in md
    return report


def _onnx_out(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_run_without_data_writes_a_valid_bundle_and_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    assert _cli(["run", "builtin:mnist_resnet", "--no-finetune", "--bench-iters", "5", "--out", str(out), "-q"]) == 0
    report = _check_bundle(out)
    assert all(v["accuracy"] is None for v in report["variants"])
    assert any("accuracy unknown" in n for n in report["notes"])
    # pruned.pt opens without unpickling code and rebuilds the pruned network exactly
    raw = torch.load(out / "pruned.pt", weights_only=True)
    assert raw["arch"] == "builtin:mnist_resnet" and raw["plan"]["kept"]
    loaded = load_model(str(out / "pruned.pt"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = loaded.model(x).numpy()
    np.testing.assert_allclose(y, _onnx_out(out / "model.onnx", x), rtol=1e-3, atol=1e-4)
    widths = {layer["name"]: layer["out_channels_after"] for layer in report["layers"]}
    for name, after in widths.items():
        assert loaded.model.get_submodule(name).out_channels == after
    # a pruned.pt written before plans were typed ({layer: removed indices}, format v1) still loads the same
    plan = raw.pop("plan")
    raw["format"] = "deploy-prune/pruned/v1"
    raw["prune_plan"] = {n: sorted(set(range(plan["widths"][n])) - set(k)) for n, k in plan["kept"].items()}
    torch.save(raw, tmp_path / "v1.pt")
    with torch.no_grad():
        np.testing.assert_allclose(load_model(str(tmp_path / "v1.pt")).model(x).numpy(), y, rtol=1e-6, atol=1e-6)
    # a plan that does not fit the architecture is refused with a clear message
    raw["prune_plan"] = {"no.such.layer": [0]}
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(BadInput, match="pruning plan does not fit"):
        load_model(str(tmp_path / "bad.pt"))


def test_run_accepts_its_own_pruned_checkpoint(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--bench-iters", "3", "--out", str(first), "-q"]) == 0
    assert _cli(["run", str(first / "pruned.pt"), "--no-finetune", "--bench-iters", "3", "--ratio", "0.25",
                 "--round-to", "1", "--out", str(second), "-q"]) == 0
    r1 = json.loads((first / "report.json").read_text())
    r2 = json.loads((second / "report.json").read_text())
    s1 = next(v for v in r1["variants"] if v["kind"] == "structured")
    d2 = next(v for v in r2["variants"] if v["kind"] == "dense")
    assert d2["params"] == s1["params"]  # the second run starts from the first run's pruned network


def test_failed_run_leaves_nothing_and_force_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    import deploy_prune.report as report_mod

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_mod, "write_report", boom)
    assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--bench-iters", "2", "--out", str(out), "--force",
                 "-q"]) == 1
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left
    monkeypatch.undo()
    assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--bench-iters", "2", "--out", str(out), "--force",
                 "-q"]) == 0
    assert not (out / "old.txt").exists() and (out / "report.json").exists()


# each criterion's own options only: an option meant for another criterion is refused (exit 2)
_OWN_FLAGS = {"slimming": ["--sparsity-epochs", "1"], "apoz": ["--calib-batches", "2"],
              "lottery": ["--lottery-rounds", "2", "--reinit-control"]}


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["l1", "slimming", "fpgm", "apoz", "lottery", "random"])
def test_every_criterion_runs_on_digits_and_reports_accuracy(criterion: str, tmp_path: Path) -> None:
    out = tmp_path / criterion
    args = ["run", "builtin:mnist_cnn", "--data", "mnist5k", "--criterion", criterion, "--epochs", "1",
            "--bench-iters", "3", *_OWN_FLAGS.get(criterion, []),
            "--out", str(out), "-q"]
    assert _cli(args) == 0
    report = _check_bundle(out)
    accs = {v["kind"]: v["accuracy"] for v in report["variants"]}
    assert all(isinstance(a, float) and 0 <= a <= 100 for a in accs.values()), accs
    assert accs["structured"] > 50  # a working digit classifier after pruning and one epoch of finetuning
    assert report["criterion"] == criterion
    if criterion == "slimming":
        assert (out / "gamma_hist.png").is_file()
    if criterion == "lottery":
        assert report["lottery"]["history"]
        assert "## Lottery ticket rounds" in (out / "report.md").read_text()
        assert isinstance(report["lottery"]["reinit_accuracy"], float)


def test_iterative_schedule_reaches_the_same_width(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--steps", "2", "--round-to", "1", "--bench-iters", "2",
                 "--out", str(out), "-q"]) == 0
    report = _check_bundle(out)
    # keep sqrt(0.5) per step, twice: about half of each layer's channels remain
    for layer in report["layers"]:
        assert 0.4 <= layer["out_channels_after"] / layer["out_channels_before"] <= 0.6, layer["name"]
    assert [s["step"] for s in report["schedule"]] == [1, 2]
    assert "## Pruning schedule" in (out / "report.md").read_text()


def test_from_sensitivity_prunes_only_the_layers_it_allows(tmp_path: Path) -> None:
    sens = tmp_path / "sensitivity.json"
    # hand-written sweep: layer "10" tolerates 50% within 1 point, layer "0" loses accuracy at once
    sens.write_text(json.dumps({"baseline": 97.0, "layers": {
        "10": {"modules": ["10"], "fractions": [0.25, 0.5, 0.75], "accuracy": [96.9, 96.5, 80.0]},
        "0": {"modules": ["0"], "fractions": [0.25, 0.5, 0.75], "accuracy": [90.0, 80.0, 50.0]},
    }}))
    out = tmp_path / "b"
    assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--from-sensitivity", str(sens), "--bench-iters", "2",
                 "--out", str(out), "-q"]) == 0
    report = _check_bundle(out)
    assert [layer["name"] for layer in report["layers"]] == ["10"]
    assert report["layers"][0]["out_channels_after"] == 32  # int(64 * 0.5), a multiple of 8
    assert report["ratio"] == round(32 / (32 + 32 + 64 + 64 + 128 + 10), 4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": 3}))
    assert _cli(["run", "builtin:mnist_cnn", "--from-sensitivity", str(bad), "--out", str(tmp_path / "c")]) == 2


def test_an_option_of_another_criterion_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    assert _cli(["run", "builtin:mnist_cnn", "--criterion", "l1", "--sparsity-epochs", "1", "--no-finetune",
                 "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--sparsity-epochs is for slimming" in err and err.count("\n") == 1
    assert not out.exists()
