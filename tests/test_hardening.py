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
