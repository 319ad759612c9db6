"""The contract's error section: every bad input is one line ``error: ...`` on stderr, exit code 2, no traceback,
nothing written at ``--out``, inputs untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deploy_prune.cli.main import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BASE = ["run", "builtin:mnist_cnn", "--no-finetune", "--bench-iters", "2", "-q"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "torchvision:resnet1800"], ["resnet1800", "did you mean"]),
        (["run", "builtin:nope"], ["nope", "mnist_cnn"]),
        (["run", "somewhere:x.pt"], ["does not exist"]),
        (BASE + ["--criterion", "taylor"], ["taylor", "l1"]),
        (BASE + ["--ratio", "1.0"], ["--ratio", "0 <= ratio < 1"]),
        (BASE + ["--ratio", "-0.1"], ["--ratio"]),
        (BASE + ["--ratio", "abc"], ["--ratio"]),
        (BASE + ["--criterion", "slimming", "--ratio", "0.7"], ["--slimming-max-layer-ratio 0.5", "--steps 2"]),
        (BASE + ["--ratio", "0.95"], ["--max-layer-ratio 0.9", "--steps 2"]),
        (BASE + ["--criterion", "apoz"], ["apoz", "--data"]),
        (BASE + ["--criterion", "lottery"], ["lottery", "--data"]),
        (BASE + ["--input-shape", "1x3xfoo"], ["--input-shape"]),
        (BASE + ["--input-shape", "1x3x32x32"], ["--input-shape"]),  # mnist_cnn takes 1 channel
        (BASE + ["--provider", "cuda"], ["CUDA"]),
        (BASE + ["--provider", "tpu"], ["tpu"]),
        (BASE + ["--data", "cifar"], ["cifar"]),
        (BASE + ["--data", "imagefolder:/nonexistent"], ["/nonexistent"]),
        (BASE + ["--no-such-flag"], ["no-such-flag"]),
        (BASE + ["--bench-target-seconds", "-1"], ["--bench-target-seconds", ">= 0"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needles: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "bundle"
    code, _, err = _run(args + ["--out", str(out_dir)] if args[0] == "run" else args, capsys)
    _assert_one_line_error(code, err, *needles)
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left behind either


def test_unreadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a checkpoint")
    code, _, err = _run(["run", str(bad), "--out", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "model.pt")
    assert bad.read_bytes() == b"this is not a checkpoint"


def test_pickled_module_refused_without_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), path)
    digest = _sha(path)
    code, _, err = _run(["run", str(path), "--out", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, err, "--trust-pickle", "pickled")
    assert _sha(path) == digest


def test_state_dict_that_matches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"foo.weight": torch.zeros(3, 3)}, path)
    code, _, err = _run(["inspect", str(path)], capsys)
    _assert_one_line_error(code, err, "--arch")


def test_state_dict_with_wrong_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lenet.pt"
    from deploy_prune.models import lenet300

    torch.save(lenet300().state_dict(), path)
    code, _, err = _run(["inspect", str(path), "--arch", "builtin:mnist_cnn"], capsys)
    _assert_one_line_error(code, err, "--arch")


def test_untraceable_model_is_refused_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dyn.pt"
    torch.save(_DataDependent(), path)
    code, _, err = _run(["inspect", str(path), "--trust-pickle", "--input-shape", "1x1x8x8"], capsys)
    _assert_one_line_error(code, err, "cannot trace")


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > 0 else self.conv(-x)


def test_non_empty_out_is_refused_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "bundle"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    code, _, err = _run(BASE + ["--out", str(out_dir)], capsys)
    _assert_one_line_error(code, err, "--force")
    assert [p.name for p in out_dir.iterdir()] == ["precious.txt"]


def test_out_inside_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.pt"
    from deploy_prune.models import mnist_cnn

    torch.save(mnist_cnn().state_dict(), path)
    code, _, err = _run(["run", str(path), "--out", str(tmp_path), "--force"], capsys)
    _assert_one_line_error(code, err, "--out")
    assert path.exists()


def test_bench_rejects_a_non_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "a.onnx"
    junk.write_text("not onnx")
    code, _, err = _run(["bench", str(junk)], capsys)
    _assert_one_line_error(code, err, "a.onnx")


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for cmd in ("run", "demo", "inspect", "sensitivity", "bench"):
        assert cmd in out
    code, out, _ = _run(["run", "--help"], capsys)
    assert code == 0
    for opt in ("--criterion", "--ratio", "--weights", "--data", "--epochs", "--no-finetune", "--input-shape",
                "--provider", "--out", "--seed", "--trust-pickle", "--bench-iters", "--force"):
        assert opt in out


def test_inspect_lists_groups_and_protected_layers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["inspect", "torchvision:resnet18", "--input-shape", "1x3x32x32"], capsys)
    assert code == 0
    assert "12 prunable channel groups" in out
    assert "conv1, layer1.0.conv2, layer1.1.conv2" in out
    assert "fc: reaches the model's output" in out
