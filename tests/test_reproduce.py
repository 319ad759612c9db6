"""``deploy-prune reproduce``: the results folder's files, keys and row fields, its one-line errors, and the two
controls it adds (largest-L1 ranking, the APoZ trimming rule). The experiments run with shrunken settings here
(the modules' ``QUICK`` dicts are patched); the real ``--quick`` run is the slow test at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deploy_prune.cli.main import main
from deploy_prune.reproduce import EXPERIMENTS

PNG = b"\x89PNG\r\n\x1a\n"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _lenet_params(c1: int, c2: int, f1: int, classes: int = 10) -> int:
    """Parameters of a 20-50-500-10 style LeNet with the given widths (28x28 input: 4x4 maps after conv2)."""
    return (c1 * 25 + c1) + (c2 * c1 * 25 + c2) + (c2 * 16 * f1 + f1) + (f1 * classes + classes)


def test_lenet5_is_the_apoz_papers_lenet() -> None:
    from deploy_prune.loading import load_model
    from deploy_prune.surgery import analyze

    model = load_model("builtin:lenet5").model
    assert sum(p.numel() for p in model.parameters()) == _lenet_params(20, 50, 500) == 431_080
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # conv2 and fc1 (the layers Hu et al. trim) are prunable groups and each enters a ReLU (APoZ needs one)
    graph = analyze(model, (1, 1, 28, 28))
    by_first = {g.modules[0]: g for g in graph.groups}
    assert by_first["3"].size == 50 and by_first["7"].size == 500
    assert all(ch.relus for ch in by_first["3"].channels + by_first["7"].channels)


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["reproduce", "--quick", "--only", "nope", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "--only" in err and "lottery" in err  # names the flag and lists the choices
    assert not (tmp_path / "o").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _, err = _run(["reproduce", "--quick", "--only", "lottery", "--out", str(full)], capsys)
    assert code == 2 and "--force" in err and (full / "keep.txt").read_text() == "mine"
    code, _, err = _run(["reproduce", "--quick", "--seeds", "0", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "--seeds" in err and not (tmp_path / "s").exists()


def test_quick_only_apoz_and_lottery(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EXPERIMENTS["apoz_lenet"], "QUICK", {**EXPERIMENTS["apoz_lenet"].QUICK, "train_epochs": 1,
                                                             "iterations": 2, "retrain_epochs": 0})
    monkeypatch.setattr(EXPERIMENTS["lottery"], "QUICK", {**EXPERIMENTS["lottery"].QUICK, "epochs": 1, "rounds": 2,
                                                          "rate_per_round": 0.5, "eval_every": 20})
    out = tmp_path / "rep"
    code, stdout, _ = _run(["reproduce", "--quick", "--seeds", "1", "--only", "lottery,apoz_lenet", "--out", str(out),
                            "-q"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["apoz_lenet.png", "lottery.png", "reproduce.json",
                                                     "reproduce.md"]
    for png in ("apoz_lenet.png", "lottery.png"):
        assert (out / png).read_bytes()[:8] == PNG
    rep = json.loads((out / "reproduce.json").read_text())
    assert rep["experiments"] == ["apoz_lenet", "lottery"]  # the runner's order, not the flag's
    assert "sensitivity" not in rep and rep["mode"] == "quick" and rep["seeds"] == 1

    apoz = rep["apoz_lenet"]
    assert len(apoz["rows"]) == 3  # the unpruned row and two trims
    for row in apoz["rows"]:
        assert {"config", "compression_rate", "initial_accuracy", "final_accuracy"} <= set(row)
        c1, c2, f1, classes = map(int, row["config"].split("-"))
        assert (c1, classes) == (20, 10)  # only conv2 and fc1 are trimmed, as in the paper
        assert row["compression_rate"] == pytest.approx(_lenet_params(20, 50, 500) / _lenet_params(c1, c2, f1),
                                                        abs=0.01)
    assert apoz["rows"][0]["config"] == "20-50-500-10" and apoz["rows"][0]["compression_rate"] == 1.0
    rates = [r["compression_rate"] for r in apoz["rows"]]
    assert rates == sorted(rates) and rates[-1] > 1.0
    assert len(apoz["paper"]["rows"]) == 5 and apoz["paper"]["rows"][-1]["compression_rate"] == 3.85

    lot = rep["lottery"]
    assert [r["level"] for r in lot["rows"]] == [0, 1, 2]
    for row in lot["rows"]:
        assert {"weights_remaining", "ticket_accuracy", "reinit_accuracy", "ticket_early_stop_iter",
                "reinit_early_stop_iter"} <= set(row)
        assert 0 <= row["ticket_early_stop_iter"] <= 59 and row["ticket_early_stop_iter"] % 20 == 0
    # per round: hidden layers keep 50%, the output layer 75% (half rate), as in the paper's LeNet schedule
    hidden, output = 784 * 300 + 300 * 100, 100 * 10
    for level, row in enumerate(lot["rows"]):
        expect = 100 * (hidden * 0.5 ** level + output * 0.75 ** level) / (hidden + output)
        assert row["weights_remaining"] == pytest.approx(expect, abs=0.05)
    for name in ("apoz_lenet", "lottery"):
        assert isinstance(rep[name]["finding"]["holds"], bool) and rep[name]["finding"]["measured"]
        assert name in stdout
    md = (out / "reproduce.md").read_text()
    assert "![lottery](lottery.png)" in md and "20-24-252-10" in md  # the paper's row beside ours


def test_largest_l1_prunes_the_largest_filters() -> None:
    from deploy_prune.reproduce.sensitivity import LargestL1
    from deploy_prune.sensitivity import sensitivity
    from deploy_prune.data import DataBundle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        for i, w in enumerate(model[0].weight):
            w.fill_(0.1 * (i + 1))  # filter i has L1 norm 0.9 * (i + 1): filter 3 is the largest
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    data = DataBundle(loader, loader, 3, (1, 1, 8, 8), "toy")
    from deploy_prune.surgery import PlanConfig, analyze, select

    graph = analyze(model, (1, 1, 8, 8))
    plan = select(graph, LargestL1(), PlanConfig(ratio=0.0, max_layer_ratio=1.0, layer_ratios={"0": 0.25}))
    assert list(plan.kept["0"]) == [0, 1, 2]
    res = sensitivity(model, data, (1, 1, 8, 8), criterion=LargestL1(), fractions=(0.5,), progress=False)
    assert res["criterion"] == "largest_l1" and res["layers"]["0"]["removed"] == [2]


def test_apoz_rule_trims_above_mean_plus_one_std() -> None:
    from deploy_prune.reproduce.apoz_lenet import _trim_counts

    class G:
        def __init__(self, gid: int, modules: tuple[str, ...], roots: list[int]) -> None:
            self.id, self.modules, self.size = gid, modules, len(roots)
            self.channels = [type("C", (), {"root": r})() for r in roots]

    class Crit:
        apoz = {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.9, 10: 0.5, 11: 0.5}

    graph = type("Graph", (), {"groups": [G(0, ("3",), [0, 1, 2, 3]), G(1, ("7",), [10, 11]), G(2, ("0",), [20])]})
    counts, means = _trim_counts(graph, Crit(), 1.0)
    # conv2: mean 0.3, std ~0.346 -> only 0.9 is above 0.646; fc1: all equal, none above; conv1 is not trimmed
    assert counts == {0: 3, 1: 2} and means == {"3": 0.3, "7": 0.5}


@pytest.mark.slow
def test_quick_run_writes_every_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    code, _, _ = _run(["reproduce", "--quick", "--out", str(out), "-q"], capsys)
    assert code == 0
    rep = json.loads((out / "reproduce.json").read_text())
    names = ["sensitivity", "l1_modes", "schedules", "slimming_gamma", "apoz_lenet", "lottery", "criteria"]
    assert rep["experiments"] == names
    for name in names:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
        assert rep[name]["rows"] and set(rep[name]["finding"]) >= {"claim", "holds", "measured"}
    assert {r["criterion"] for r in rep["criteria"]["rows"]} == {"l1", "slimming", "fpgm", "apoz", "lottery", "random"}
    assert all(r["seeds"] == 2 for r in rep["criteria"]["rows"])
    hist = rep["slimming_gamma"]["gamma_hist"]
    assert [h["lambda"] for h in hist["by_lambda"]][:3] == [0.0, 1e-5, 1e-4]  # then the scaled ones
    assert all(sum(h["counts"]) == 32 + 32 + 64 + 64 + 128 for h in hist["by_lambda"])  # every BN channel
