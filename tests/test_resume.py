"""Interrupted runs: Ctrl-C and SIGKILL mid-finetuning, --resume, the staging folder and its lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _tiny import tiny_digits  # noqa: F401 - the fixture
from deploy_prune.cli.main import main
from deploy_prune.errors import BadInput
from deploy_prune.resume import Workspace, partial_dir

TINY = ["--input-shape", "1x1x28x28", "--batch-size", "16", "--bench-iters", "3", "-q"]


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0)


def _args(data: Path, epochs: int) -> list[str]:
    # two steps: the second step's channels depend on the first step's finetuned weights
    return ["run", "builtin:mnist_cnn", "--data", f"imagefolder:{data}", "--steps", "2", "--epochs", str(epochs),
            *TINY]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal, even when the test runner ignores SIGINT


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "deploy_prune", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_epochs(out: Path, epochs: int, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    """Poll the run's checkpoint index until its first training run has saved ``epochs`` epochs."""
    index = partial_dir(out) / "checkpoints" / "index.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if json.loads(index.read_text())["calls"]["0"]["done"] >= epochs:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError("the run saved no epoch in time")


def _same_result(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert [(x["name"], x["kept"]) for x in ra["layers"]] == [(x["name"], x["kept"]) for x in rb["layers"]]
    sa, sb = (torch.load(p / "pruned.pt", weights_only=True)["state_dict"] for p in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # CPU training is deterministic: the very same weights


def _resume_and_compare(tmp_path: Path, data: Path, epochs: int, out: Path,
                        monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    # a new run without --resume does not silently throw the saved epochs away
    assert _cli([*_args(data, epochs), "--out", str(out)]) == 2
    # --resume with other arguments is refused
    assert _cli([*_args(data, epochs + 1), "--out", str(out), "--resume"]) == 2
    monkeypatch.setenv("DEPLOY_PRUNE_TRACE", str(tmp_path / "trace-resumed"))
    assert _cli([*_args(data, epochs), "--out", str(out), "--resume"]) == 0
    resumed = json.loads((tmp_path / "trace-resumed" / "rank-0.json").read_text())["training"]
    monkeypatch.setenv("DEPLOY_PRUNE_TRACE", str(tmp_path / "trace-ref"))
    ref = tmp_path / "ref"
    assert _cli([*_args(data, epochs), "--out", str(ref)]) == 0
    full = json.loads((tmp_path / "trace-ref" / "rank-0.json").read_text())["training"]
    _same_result(out, ref)
    assert [t["desc"] for t in resumed] == [t["desc"] for t in full]
    for t, f in zip(resumed, full):
        assert t["restored"] + t["trained"] == f["trained"] == epochs
        assert t["losses"] == f["losses"]
    assert resumed[0]["restored"] >= 2  # continued from the saved epochs...
    assert sum(t["trained"] for t in resumed) < sum(f["trained"] for f in full)  # ...instead of starting over
    assert not partial_dir(out).exists() and not partial_dir(ref).exists()
    return resumed


def test_ctrl_c_mid_finetuning_exits_130_and_resume_ends_like_an_uninterrupted_run(
        tmp_path: Path, tiny_digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs, out = 12, tmp_path / "b"
    proc = _start([*_args(tiny_digits, epochs), "--out", str(out)], tmp_path)
    _wait_for_epochs(out, 2, proc)
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted;"), err[-2000:]
    assert "--resume" in lines[0] and str(partial_dir(out)) in lines[0]
    assert not out.exists() and (partial_dir(out) / "checkpoints").is_dir()
    _resume_and_compare(tmp_path, tiny_digits, epochs, out, monkeypatch)


@pytest.mark.slow
def test_sigkill_mid_finetuning_then_resume_ends_like_an_uninterrupted_run(
        tmp_path: Path, tiny_digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs, out = 12, tmp_path / "b"
    proc = _start([*_args(tiny_digits, epochs), "--out", str(out)], tmp_path)
    _wait_for_epochs(out, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial_dir(out).is_dir()
    _resume_and_compare(tmp_path, tiny_digits, epochs, out, monkeypatch)


def test_an_interrupt_typer_turns_into_a_return_value_still_exits_130(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import deploy_prune.pipeline as pipeline

    def interrupted(spec: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--out", str(tmp_path / "b")]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: interrupted; nothing was written"]


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    first = Workspace.open(out, {"args": {}}, resume=False, force=False)
    try:
        assert _cli(["run", "builtin:mnist_cnn", "--no-finetune", "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"another deploy-prune run (pid {os.getpid()}) is writing --out {out}" in err
        assert err.count("\n") == 1 and not out.exists()
    finally:
        first._unlock()  # noqa: SLF001


def test_staging_left_by_killed_runs_is_reported_and_dealt_with(tmp_path: Path) -> None:
    out = tmp_path / "b"
    old = [tmp_path / ".b.k3x_9abc", tmp_path / ".b.old-1700000000"]  # older versions' staging folders
    for d in old:
        d.mkdir()
        (d / "dense.onnx").write_bytes(b"x")
    mine = tmp_path / ".b.notmine"  # not only bundle files inside: somebody else's, kept
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    notes: list[str] = []
    ws = Workspace.open(out, {"args": {"a": 1}}, resume=False, force=False, note=notes.append)
    assert not any(d.exists() for d in old) and mine.exists()
    assert sum("left by a killed run" in n for n in notes) == 2
    ws.checkpoints.joinpath("index.json").write_text(json.dumps({"calls": {"0": {"done": 3, "epochs": 5}}}))
    ws._unlock()  # noqa: SLF001 - the run was killed: its lock died with it
    with pytest.raises(BadInput, match="3 saved training epoch.*resume.*force"):
        Workspace.open(out, {"args": {"a": 1}}, resume=False, force=False)
    with pytest.raises(BadInput, match="other arguments.*differs in: args.a"):
        Workspace.open(out, {"args": {"a": 2}}, resume=True, force=False)
    notes.clear()
    ws = Workspace.open(out, {"args": {"a": 1}}, resume=True, force=False, note=notes.append)
    assert any("resuming" in n and "3 training epoch" in n for n in notes)
    ws._unlock()  # noqa: SLF001
    notes.clear()
    ws = Workspace.open(out, {"args": {"a": 2}}, resume=False, force=True, note=notes.append)
    assert any("discarding" in n for n in notes) and not any(ws.checkpoints.iterdir())
    ws.discard()
    ws._unlock()  # noqa: SLF001
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.notmine"]
