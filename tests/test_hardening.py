"""Inputs that used to end in a misleading internal failure: non-finite weights and outputs that are
identically zero (a zero-initialised classifier)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deploy_prune.cli.main import main
from deploy_prune.models import lenet300


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _one_line_exit_2(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_checkpoint_with_a_non_finite_weight_is_refused_at_load(bad: float, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    sd = lenet300().state_dict()
    sd["3.weight"][3, 7] = bad
    path = tmp_path / "diverged.pt"
    torch.save({"arch": "builtin:lenet300", "state_dict": sd}, path)
    out = tmp_path / "bundle"
    code, _, err = _run(["run", str(path), "--no-finetune", "--bench-iters", "2", "-q", "--out", str(out)], capsys)
    line = _one_line_exit_2(code, err)
    assert "3.weight" in line and ("NaN" in line if math.isnan(bad) else "infinite" in line), line
    assert "RuntimeWarning" not in err and not out.exists()


def test_weights_flag_with_a_nan_buffer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deploy_prune.models import mnist_cnn

    sd = mnist_cnn().state_dict()
    bn = next(k for k in sd if k.endswith("running_var"))
    sd[bn][0] = math.nan
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    code, _, err = _run(["inspect", "builtin:mnist_cnn", "--weights", str(path)], capsys)
    assert bn in _one_line_exit_2(code, err)


# ---------------------------------------------------------------------------------------------------------
# outputs that are identically zero


class _ZeroHead(nn.Module):
    """A residual CNN whose classifier is zero-initialised, as torchvision does for ViT's head."""

    def __init__(self, scale_output: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.scale_output = scale_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.body(h)).mean((2, 3))
        y = self.head(h)
        return y * 2.0 if self.scale_output else y


@pytest.mark.parametrize("external", [False, True])
def test_a_zero_output_is_verified_at_the_classifier_input(tmp_path: Path, external: bool) -> None:
    # external: the weights in a sidecar file, as for models over 2 GB (ViT-H/14 at random init hit ONNX Runtime's
    # "external data path escapes model directory" through the probe's symlinked sidecar)
    from deploy_prune.export import cleanup_onnx, export_onnx, parity

    torch.manual_seed(0)
    model = _ZeroHead().eval()
    x = torch.randn(2, 3, 8, 8)
    export_onnx(model, tmp_path / "raw.onnx", x, external_data=external)
    cleanup_onnx(tmp_path / "raw.onnx", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists() == external
    res = parity(tmp_path / "m.onnx", model, [x])
    assert res["ok"] and res["max_abs_diff"] == 0.0 and res["ref_max_abs"] == 0.0
    head = res["head_input"]
    assert head["layer"] == "head" and head["ok"] and head["ref_max_abs"] > 0
    assert "classifier's input" in res["note"]
    # the probe really looks at the graph: the same file checked against a model whose body differs fails
    other = _ZeroHead().eval()
    assert not parity(tmp_path / "m.onnx", other, [x])["ok"]
    left = sorted(p.name for p in tmp_path.iterdir())  # no probe file left behind
    assert left == (["m.onnx", "m.onnx.data", "raw.onnx", "raw.onnx.data"] if external else ["m.onnx", "raw.onnx"])


def test_a_zero_output_that_cannot_be_probed_is_a_bad_input_asking_for_weights(tmp_path: Path) -> None:
    from deploy_prune.errors import BadInput
    from deploy_prune.export import export_onnx, parity

    model = _ZeroHead(scale_output=True).eval()
    x = torch.randn(1, 3, 8, 8)
    export_onnx(model, tmp_path / "m.onnx", x)
    with pytest.raises(BadInput) as exc:
        parity(tmp_path / "m.onnx", model, [x])
    msg = str(exc.value)
    assert "identically zero" in msg and "weights" in msg and "disagrees" not in msg
    assert "--weights" in exc.value.cli_message() and "\n" not in msg


def test_run_with_a_zero_initialised_classifier_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from deploy_prune.models import mnist_cnn

    model = mnist_cnn()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    path = tmp_path / "zero_head.pt"
    torch.save({"arch": "builtin:mnist_cnn", "state_dict": model.state_dict()}, path)
    out = tmp_path / "bundle"
    code, _, err = _run(["run", str(path), "--no-finetune", "--bench-iters", "2", "-q", "--out", str(out)], capsys)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert all(v["parity"]["ok"] and v["parity"]["max_abs_diff"] == 0.0 for v in rep["variants"])
    assert sum("parity was proven on the classifier's input" in n for n in rep["notes"]) == 3  # every variant


def test_run_with_an_all_zero_model_says_why_and_asks_for_weights(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from deploy_prune.models import mnist_cnn

    model = mnist_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    path = tmp_path / "zeros.pt"
    torch.save({"arch": "builtin:mnist_cnn", "state_dict": model.state_dict()}, path)
    out = tmp_path / "bundle"
    code, _, err = _run(["run", str(path), "--no-finetune", "--bench-iters", "2", "-q", "--out", str(out)], capsys)
    line = _one_line_exit_2(code, err)
    assert "identically zero" in line and "--weights" in line and "disagrees" not in line
    assert not out.exists()


class _ZeroHeadExportsDifferently(_ZeroHead):
    """Zero classifier over a body that computes something else while exported: a real disagreement that only
    the classifier's input shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if torch.compiler.is_exporting():
            h = h * 1.5
        return self.head(torch.relu(h + self.body(h)).mean((2, 3)))


def test_a_zero_output_over_a_wrong_graph_is_a_disagreement_with_numbers(tmp_path: Path) -> None:
    import deploy_prune as dp

    with pytest.raises(dp.ParityError) as exc:
        dp.export(_ZeroHeadExportsDifferently().eval(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    msg = str(exc.value)
    assert "disagrees" in msg and "classifier input max|diff|" in msg and "max|diff| 0 " not in msg, msg
    assert not (tmp_path / "m.onnx").exists()


def test_running_out_of_memory_is_one_line_exit_2_and_writes_nothing(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # a real allocation failure, not a simulated one: a batch of 2^20 28x28 digits through the convs needs about
    # 100 TB for the first activation, which no machine's allocator grants
    out = tmp_path / "bundle"
    code, _, err = _run(["run", "builtin:mnist_cnn", "--no-finetune", "--input-shape", "1048576x1x28x28",
                         "--bench-iters", "2", "-q", "--out", str(out)], capsys)
    line = _one_line_exit_2(code, err)
    assert line.startswith("error: out of memory") and "--input-shape" in line
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_what_counts_as_out_of_memory() -> None:
    from deploy_prune.errors import DeployPruneError, is_out_of_memory

    with pytest.raises(RuntimeError) as real:  # torch's own allocator refusing an impossible request
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(real.value)
    assert is_out_of_memory(MemoryError())
    try:  # a wrapped one, as the ONNX checker's std::bad_alloc reaches the CLI inside an export error
        try:
            raise MemoryError("std::bad_alloc")
        except MemoryError as exc:
            raise DeployPruneError("model.onnx is not a valid ONNX model: MemoryError: std::bad_alloc") from exc
    except DeployPruneError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(ValueError("shapes do not match"))
    assert not is_out_of_memory(None)
