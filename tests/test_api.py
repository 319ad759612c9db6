"""The public Python API (docs/api.md), used through ``import deploy_prune as dp`` and public names only."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import deploy_prune as dp

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


class ResConcat(nn.Module):
    """A model no zoo has: a residual block and a concat of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.a = nn.Conv2d(16, 16, 1)
        self.b = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.fuse = nn.Conv2d(24, 32, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(self.fuse(x).mean((2, 3)))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = ResConcat()
    with torch.no_grad():  # BN statistics that are not the identity, so the exported graph has real work
        m.train()(torch.randn(8, 3, 16, 16))
    return m.eval()


def test_public_surface_is_all_and_survives_internal_imports() -> None:
    import deploy_prune.cli.main  # noqa: F401 - imports every internal module the CLI uses
    import deploy_prune.pipeline  # noqa: F401

    assert callable(dp.prune) and callable(dp.export) and callable(dp.benchmark) and callable(dp.load)
    assert dp.prune.__module__ == dp.export.__module__ == "deploy_prune.api"
    for name in dp.__all__:
        assert hasattr(dp, name), name
    assert issubclass(dp.BadInput, dp.DeployPruneError) and issubclass(dp.ParityError, dp.DeployPruneError)


def test_prune_export_benchmark_a_custom_model(model: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    ref = model(x)

    res = dp.prune(model, x, criterion="l1", ratio=0.5)

    # the input model is untouched: same tensors, same values, same widths, same output, same mode
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.fuse.in_channels == 24 and not model.training
    assert torch.equal(model(x), ref)

    # the plan is plain JSON and describes the pruned copy
    plan = json.loads(json.dumps(res.plan))
    assert plan == res.plan
    kept = plan["kept"]
    assert kept["stem.0"] == kept["res.3"]  # the residual couples them
    assert res.model.stem[0].out_channels == len(kept["stem.0"]) < 16
    assert res.model.fuse.in_channels == len(kept.get("a", range(16))) + len(kept.get("b.0", range(8)))
    assert "fc" not in kept and "fc" in res.skipped
    assert res.params_after < res.params_before and res.macs_after < res.macs_before
    assert res.model(x).shape == (1, 5)
    assert [r["name"] for r in res.layers()] == list(kept)

    dense = dp.export(model, x, tmp_path / "dense.onnx")
    pruned = dp.export(res.model, x, tmp_path / "out" / "model.onnx")
    assert pruned.path == tmp_path / "out" / "model.onnx" and pruned.path.is_file()
    assert dense.parity["ok"] and pruned.parity["ok"] and pruned.onnx_bytes < dense.onnx_bytes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]  # no temp files left

    bench = dp.benchmark([tmp_path / "dense.onnx", tmp_path / "out" / "model.onnx"], iters=5)
    assert isinstance(bench, dp.BenchResult)
    assert set(bench.stats) == {"dense", "model"} and all(s.n == 5 for s in bench.stats.values())
    assert bench.speedups("dense")["dense"] == 1.0


def test_prune_keeps_the_callers_mode_and_takes_a_dataloader(model: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    model.train()
    loader = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(2)]
    res = dp.prune(model, x, criterion="apoz", ratio=0.5, round_to=4, data=loader, calib_batches=2)
    assert model.training and res.model.training
    assert res.plan["kept"] and res.ratio == 0.5


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"ratio": 1.5}, ["ratio 1.5 is out of range"]),
        ({"ratio": 0.5, "target_speedup": 2.0}, ["ratio", "target_speedup", "exclude"]),
        ({"criterion": "taylor"}, ["taylor", "l1"]),
        ({"criterion": "apoz"}, ["apoz", "data"]),
        ({"criterion": "lottery"}, ["lottery", "criterion"]),
        ({"l1_mode": "nope"}, ["l1_mode"]),
        ({"calib_batches": 3}, ["calib_batches", "apoz"]),
        ({"target_speedup": 0.5}, ["target_speedup 0.5 is out of range"]),
        ({"target_latency": -1.0}, ["target_latency"]),
        ({"ratio": 0.5, "round_to": 0}, ["round_to"]),
    ],
)
def test_errors_are_the_cli_line_with_keyword_names(model: nn.Module, kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(dp.BadInput) as exc:
        dp.prune(model, torch.randn(1, 3, 16, 16), **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg and "--" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_example_input_and_nan_weights_are_bad_inputs(model: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(dp.BadInput, match="example_input"):
        dp.prune(model, torch.randn(1, 5, 16, 16))
    with pytest.raises(dp.BadInput, match="example_input"):
        dp.export(model, [1, 2, 3], tmp_path / "m.onnx")  # type: ignore[arg-type]
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fuse.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(dp.BadInput, match=r"fuse\.weight"):
        dp.prune(broken, torch.randn(1, 3, 16, 16))
    with pytest.raises(dp.BadInput, match=r"fuse\.weight"):
        dp.export(broken, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class _ExportsDifferently(nn.Module):
    """Computes something else while being exported: a real ONNX/PyTorch disagreement, no mock."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y + 1.0 if torch.compiler.is_exporting() else y


def test_export_gates_on_parity_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")  # an existing file is only replaced by a verified one
    with pytest.raises(dp.ParityError, match="disagrees"):
        dp.export(_ExportsDifferently().eval(), torch.randn(1, 3, 8, 8), path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def _shell_run(block: str, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy_prune.cli.main import main

    argv = shlex.split(block.strip())
    assert argv[0] == "deploy-prune"
    with pytest.raises(SystemExit) as exc:
        main(argv[1:])
    assert exc.value.code in (0, None), capsys.readouterr().err


def test_docs_api_md_example_1_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    python = _blocks("python")
    assert len(python) == 2
    exec(compile(python[0], "docs/api.md#1", "exec"), {"__name__": "docs_api_1"})
    out = capsys.readouterr().out
    assert "faster on CPUExecutionProvider" in out and "parity max|diff|" in out
    assert (tmp_path / "dense.onnx").is_file() and (tmp_path / "model.onnx").is_file()


def test_docs_api_md_example_2_round_trip_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """prune with the CLI → the user's training loop on dp.load(pruned.pt) → run --ratio 0: export, verify, report."""
    monkeypatch.chdir(tmp_path)
    python, shell = _blocks("python"), _blocks("bash")
    assert len(shell) == 2
    _shell_run(shell[0], capsys)
    exec(compile(python[1], "docs/api.md#2", "exec"), {"__name__": "docs_api_2"})
    _shell_run(shell[1], capsys)
    report = json.loads((tmp_path / "final" / "report.json").read_text())
    first = json.loads((tmp_path / "bundle" / "report.json").read_text())
    structured = {v["kind"]: v for v in report["variants"]}["structured"]
    assert structured["params"] == {v["kind"]: v for v in first["variants"]}["structured"]["params"]
    assert report["layers"] == [] and structured["parity"]["ok"]
    # the finetuned weights, not the bundle's, went into the new bundle
    finetuned = torch.load(tmp_path / "finetuned.pt", weights_only=True)["state_dict"]
    original = torch.load(tmp_path / "bundle" / "pruned.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(finetuned[k], original[k]) for k in finetuned)
