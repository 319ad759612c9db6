"""``timm:NAME`` models: loading, a run end to end, and pruned.pt rebuilding stored split sizes without code.

timm is in the ``test`` extra, so these always run in the default suite; the models are timm's own tiny test
architectures or analysed at a small input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_prune.cli.main import main
from deploy_prune.criteria import ScoreContext, create
from deploy_prune.errors import BadInput
from deploy_prune.loading import load_model, save_pruned
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select

timm = pytest.importorskip("timm")  # in the test extra; skipped only where someone installed without it


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0)


def test_timm_model_runs_end_to_end(tmp_path: Path) -> None:
    from test_pipeline import _check_bundle, _onnx_out

    out = tmp_path / "bundle"
    # timm's tiny EfficientNet: BatchNormAct2d (BN with its activation inside), SE, SelectAdaptivePool2d head
    assert _cli(["run", "timm:test_efficientnet", "--input-shape", "1x3x32x32", "--no-finetune",
                 "--bench-iters", "3", "--out", str(out), "-q"]) == 0
    report = _check_bundle(out)
    assert len(report["layers"]) > 5
    raw = torch.load(out / "pruned.pt", weights_only=True)
    assert raw["arch"] == "timm:test_efficientnet"
    loaded = load_model(str(out / "pruned.pt"))  # rebuilt from the arch string and the plan, no code from the file
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = loaded.model(x).numpy()
    np.testing.assert_allclose(y, _onnx_out(out / "model.onnx", x), rtol=1e-3, atol=1e-4 * float(np.abs(y).max()))


def test_pruned_checkpoint_rebuilds_rewritten_split_sizes(tmp_path: Path) -> None:
    # MixNet's MixedConv2d splits at sizes it stores in ``splits``: pruning rewrites them, and pruned.pt must
    # rewrite them the same way on a freshly built model
    loaded = load_model("timm:mixnet_s")
    model, shape = loaded.model, (1, 3, 32, 32)
    before = {n: list(m.splits) for n, m in model.named_modules() if hasattr(m, "splits")}
    graph = analyze(model, shape)
    crit = create("l1")
    crit.prepare(model, graph, ScoreContext())
    plan = select(graph, crit, PlanConfig(ratio=0.5, round_to=8))
    prune_channels(model, graph, plan)
    after = {n: list(m.splits) for n, m in model.named_modules() if hasattr(m, "splits")}
    assert after != before and all(min(v) >= 1 for v in after.values())
    save_pruned(tmp_path / "pruned.pt", model, arch=loaded.arch, num_classes=loaded.num_classes,
                input_shape=shape, plan=plan)
    again = load_model(str(tmp_path / "pruned.pt"))
    assert {n: list(m.splits) for n, m in again.model.named_modules() if hasattr(m, "splits")} == after
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), model(x))


def test_weights_and_arch_accept_timm(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    x = torch.randn(1, 3, 32, 32)
    for loaded in (load_model("timm:test_resnet", weights=str(tmp_path / "sd.pt")),
                   load_model(str(tmp_path / "sd.pt"), arch="timm:test_resnet")):
        assert loaded.num_classes == 7 and loaded.arch == "timm:test_resnet"
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), ref(x))
    assert load_model("timm:test_resnet").input_shape == (1, 3, 160, 160)  # timm's config gives the input size


def test_unknown_timm_name_suggests_close_ones() -> None:
    with pytest.raises(BadInput, match="did you mean.*mixnet_s"):
        load_model("timm:mixnet_ss")


def test_missing_timm_is_a_one_line_exit_2(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, as when it is not installed
    code = _cli(["inspect", "timm:resnet18"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "pip install 'deploy-prune[timm]'" in lines[0]


def test_inspect_sees_through_ghostnet() -> None:
    # GhostNet's concat sliced back to ``out_chs``: only the classifier is left alone (before: all but 9 layers)
    graph = analyze(load_model("timm:ghostnet_050").model, (1, 3, 32, 32))
    assert set(graph.skipped) == {"classifier"}


def test_batchnorm_act_relu_is_an_apoz_site() -> None:
    # timm's BatchNormAct2d applies its ReLU inside the norm layer: APoZ must still find the post-ReLU output
    graph = analyze(load_model("timm:regnetx_002").model, (1, 3, 32, 32))
    chans = [c for g in graph.groups for c in g.channels]
    assert chans and all(c.relus for c in chans)
