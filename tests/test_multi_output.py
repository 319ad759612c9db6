"""Models with several outputs (issue #12): a dict, tuple or list of tensors goes through the whole pipeline;
torchvision segmentation models (``torchvision:segmentation.NAME``) and detector backbones + FPN
(``torchvision:detection.NAME.backbone``) prune, export and keep every output's name and shape."""

from __future__ import annotations

import json
from collections import OrderedDict, namedtuple
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn

from deploy_prune import dense_models
from deploy_prune.cli.main import main
from deploy_prune.criteria import ScoreContext, create
from deploy_prune.errors import BadInput
from deploy_prune.export import export_onnx, parity
from deploy_prune.loading import load_model
from deploy_prune.outputs import named_outputs
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, roots_from_plan, select

SHAPE = (1, 3, 16, 16)


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _Trunk(nn.Module):
    def __init__(self, cin: int = 3) -> None:
        super().__init__()
        self.stem = _cbr(cin, 16)
        self.body = _cbr(16, 32)
        self.seg = nn.Conv2d(32, 3, 1)  # a dense head: 3 classes per pixel
        self.aux = nn.Conv2d(16, 2, 1)  # a second dense head on an earlier feature
        self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


class TupleHeads(_Trunk):
    """Classification logits and a segmentation map, returned as a tuple."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(self.stem(x))
        return self.cls(f), self.seg(f)


class DictHeads(_Trunk):
    """Two dense heads returned as a dict, like torchvision's segmentation models."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.stem(x)
        f = self.body(s)
        return OrderedDict(seg=self.seg(f), aux=self.aux(s))


class NoneInTuple(_Trunk):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.seg(self.body(self.stem(x))), None


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0), capsys.readouterr().err


def _save(model: nn.Module, path: Path, shape: tuple[int, ...] = SHAPE) -> Path:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so outputs are of order 1
        for _ in range(3):
            model(torch.randn(8, *shape[1:]))
    torch.save(model.eval(), path)
    return path


# ----------------------------------------------------------------------------------------------------------
# output naming


def test_outputs_are_named_after_keys_fields_or_positions() -> None:
    t = torch.zeros(1)
    assert [n for n, _ in named_outputs(t)] == ["logits"]
    assert [n for n, _ in named_outputs({"out": t, "aux": t})] == ["out", "aux"]
    assert [n for n, _ in named_outputs((t, t))] == ["output_0", "output_1"]
    assert [n for n, _ in named_outputs([t])] == ["output_0"]
    Pair = namedtuple("Pair", "boxes scores")
    assert [n for n, _ in named_outputs(Pair(t, t))] == ["boxes", "scores"]
    # the file's input is called "input"; keys that clash or are not plain names are made unique and safe
    assert [n for n, _ in named_outputs({"input": t, 0: t, "a b": t, "a_b": t})] == ["input_output", "0", "a_b",
                                                                                     "a_b_1"]


@pytest.mark.parametrize("out, found", [
    ((torch.zeros(1), None), "item 'output_1' is a NoneType"),
    ([{"boxes": torch.zeros(1)}], "item 'output_0' is a dict"),
    ({}, "an empty dict"),
    ("logits", "which is not a tensor"),
])
def test_other_outputs_are_refused_with_what_was_found(out: object, found: str) -> None:
    with pytest.raises(BadInput, match=found):
        named_outputs(out)


# ----------------------------------------------------------------------------------------------------------
# end to end through the CLI (pickled modules, as in the issue)


@pytest.mark.parametrize("cls, names, shapes", [
    (TupleHeads, ["output_0", "output_1"], [[1, 5], [1, 3, 16, 16]]),
    (DictHeads, ["seg", "aux"], [[1, 3, 16, 16], [1, 2, 16, 16]]),
], ids=["tuple", "dict"])
def test_a_model_with_several_outputs_runs_end_to_end(cls: type, names: list[str], shapes: list[list[int]],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(cls(), tmp_path / "m.pt")
    out = tmp_path / "bundle"
    code, err = _run(["run", str(model), "--trust-pickle", "--no-finetune", "--input-shape", "1x3x16x16",
                      "--round-to", "1", "--bench-iters", "2", "-q", "--out", str(out)], capsys)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())  # validated against the schema when written
    assert rep["outputs"] == [{"name": n, "shape": s} for n, s in zip(names, shapes)]
    for v in rep["variants"]:
        assert v["parity"]["ok"]
        assert set(v["parity"]["outputs"]) == set(names)  # every output compared, each on its own scale
        proto = onnx.load(str(out / v["onnx"]))
        assert [o.name for o in proto.graph.output] == names
    st = next(v for v in rep["variants"] if v["kind"] == "structured")
    dense = next(v for v in rep["variants"] if v["kind"] == "dense")
    assert st["macs"] < dense["macs"]
    assert rep["layers"], "the trunk should lose channels"
    # the heads reach the outputs: their widths are kept, like a classifier's classes
    pruned = {layer["name"] for layer in rep["layers"]}
    assert not pruned & {"seg", "aux", "cls.2"}
    assert "`seg`" in (out / "report.md").read_text() or "`output_1`" in (out / "report.md").read_text()


def test_an_output_that_is_not_tensors_is_a_one_line_exit_2(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(NoneInTuple(), tmp_path / "m.pt")
    code, err = _run(["run", str(model), "--trust-pickle", "--no-finetune", "--input-shape", "1x3x16x16",
                      "--out", str(tmp_path / "b")], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the model returns tuple[Tensor, NoneType]")
    assert not (tmp_path / "b").exists()


def test_data_with_dense_outputs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(DictHeads(cin=1), tmp_path / "m.pt", (1, 1, 28, 28))
    code, err = _run(["run", str(model), "--trust-pickle", "--data", "mnist5k",
                      "--out", str(tmp_path / "b")], capsys)
    assert code == 2
    assert "seg, aux rather than one logits tensor" in err and "--data" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# torchvision specs


def test_segmentation_specs_build_random_init_without_aux_unless_the_weights_have_it(tmp_path: Path) -> None:
    import torchvision

    loaded = load_model("torchvision:segmentation.lraspp_mobilenet_v3_large")
    assert type(loaded.model).__name__ == "LRASPP" and loaded.num_classes == 21
    with torch.no_grad():
        y = loaded.model(torch.randn(1, 3, 64, 64))
    assert list(y) == ["out"] and y["out"].shape == (1, 21, 64, 64)
    name = "deeplabv3_mobilenet_v3_large"
    ref = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    torch.save(ref.state_dict(), tmp_path / "seg.pt")
    got = load_model(f"torchvision:segmentation.{name}", weights=str(tmp_path / "seg.pt")).model
    assert got.aux_classifier is not None and got.classifier[4].out_channels == 4
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    # a bare state_dict is recognised among the segmentation models too
    assert load_model(str(tmp_path / "seg.pt")).arch == f"torchvision:segmentation.{name}"


@pytest.mark.parametrize("spec, found", [
    ("torchvision:lraspp_mobilenet_v3_large", "use torchvision:segmentation.lraspp_mobilenet_v3_large"),
    ("torchvision:segmentation.fcn_resnet5", "did you mean fcn_resnet50"),
    ("torchvision:detection.fasterrcnn_resnet50_fpn", "prune its backbone + FPN with "
                                                      "torchvision:detection.fasterrcnn_resnet50_fpn.backbone"),
    ("torchvision:detection.nosuchnet.backbone", "unknown torchvision detection model"),
])
def test_dense_specs_say_what_to_use(spec: str, found: str) -> None:
    with pytest.raises(BadInput, match=found.replace("+", r"\+").replace(".", r"\.")):
        load_model(spec)


def _silence(model: nn.Module, graph: object, plan: object) -> None:
    """Zero every conv/linear weight column that reads a channel ``plan`` removes (as in test_surgery.py)."""
    removed = roots_from_plan(graph, plan)
    for c in graph.consumers:
        if c.role not in ("in", "grouped"):
            continue
        roots = graph.el.roots(c.labels)
        if c.role == "grouped":
            m = graph.module(c.name)
            roots = roots[: m.in_channels // m.groups]
        cols = torch.tensor([i for i, r in enumerate(roots.tolist()) if r in removed], dtype=torch.long)
        if len(cols):
            with torch.no_grad():
                graph.module(c.name).weight.index_fill_(1, cols, 0.0)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_removing_silent_channels_keeps_every_output_of_a_segmentation_model(name: str) -> None:
    # LRASPP: two heads on two backbone stages, squeeze-and-excitation gating; DeepLabV3: ASPP's five parallel
    # branches concatenated (with a global-pool branch upsampled back)
    torch.manual_seed(0)
    model = dense_models.build(f"segmentation.{name}")
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    model.eval()
    shape = (1, 3, 32, 32)
    graph = analyze(model, shape)
    crit = create("random")
    crit.prepare(model, graph, ScoreContext(seed=0))
    plan = select(graph, crit, PlanConfig(ratio=0.5, round_to=1))
    assert plan.kept
    _silence(model, graph, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    prune_channels(model, graph, plan)
    with torch.no_grad():
        after = model(x)
    assert list(after) == list(before)
    for k in before:
        assert after[k].shape == before[k].shape
        assert before[k].abs().max() > 1e-3  # a real signal, not a vanished one
        torch.testing.assert_close(after[k], before[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_detector_backbone_with_fpn_prunes_exports_and_fits_back(tmp_path: Path) -> None:
    name = "retinanet_resnet50_fpn"  # ResNet-50 + FPN + P6/P7: outputs of order 0.1-100 at random init
    loaded = load_model(f"torchvision:detection.{name}.backbone")
    model, shape = loaded.model, (1, 3, 128, 128)
    with torch.no_grad():
        before = {k: v.shape for k, v in model(torch.randn(*shape)).items()}
    graph = analyze(model, shape)
    crit = create("l1")
    crit.prepare(model, graph, ScoreContext(seed=0))
    plan = select(graph, crit, PlanConfig(ratio=0.5, round_to=8))
    prune_channels(model, graph, plan)
    assert any(n.startswith("body.") for n in plan.kept)
    # the FPN's outputs (its 3x3 output convs and P6/P7) keep out_channels, which the heads read; its lateral 1x1
    # convs and top-down sum are internal to the backbone, so they may narrow
    assert not any(n.startswith(("fpn.layer_blocks.", "fpn.extra_blocks.")) for n in plan.kept)
    with torch.no_grad():
        after = {k: v.shape for k, v in model(torch.randn(*shape)).items()}
    assert after == before and list(after) == ["0", "1", "2", "p6", "p7"]
    path = tmp_path / "backbone.onnx"
    export_onnx(model, path, torch.randn(*shape))
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["0", "1", "2", "p6", "p7"]
    res = parity(path, model, [torch.randn(*shape), torch.randn(2, *shape[1:])])
    assert res["ok"] and res["ref_max_abs"] > 1e-2, res  # a real signal, judged per output
    det = dense_models.detector_with_backbone(name, model)
    with torch.no_grad():
        boxes = det([torch.rand(3, 128, 128)])[0]
    assert set(boxes) == {"boxes", "scores", "labels"}


@pytest.mark.slow
def test_a_whole_detector_exports_or_is_refused_with_the_exporters_reason(tmp_path: Path) -> None:
    from deploy_prune.detector_export import export_detector

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    backbone = load_model(f"torchvision:detection.{name}.backbone").model
    shape = (1, 3, 128, 128)
    graph = analyze(backbone, shape)
    crit = create("l1")
    crit.prepare(backbone, graph, ScoreContext(seed=0))
    prune_channels(backbone, graph, select(graph, crit, PlanConfig(ratio=0.5, round_to=8)))
    det = dense_models.detector_with_backbone(name, backbone)
    path = tmp_path / "detector.onnx"
    try:
        export_detector(det, path, (1, 3, 320, 320))
    except BadInput as exc:  # torch 2.14: the dynamo exporter cannot trace NMS's data-dependent box count
        assert "cannot be exported by torch.onnx's dynamo exporter (" in str(exc) and "dynamo=False" in str(exc)
        assert not path.exists()
    else:
        assert [o.name for o in onnx.load(str(path)).graph.output] == ["boxes", "scores", "labels"]


def test_a_pruned_segmentation_model_with_its_aux_head_reloads_from_pruned_pt(tmp_path: Path) -> None:
    import torchvision

    from deploy_prune.loading import save_pruned

    torch.manual_seed(0)
    ref = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None,
                                       num_classes=3, aux_loss=True)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    spec = "torchvision:segmentation.deeplabv3_mobilenet_v3_large"
    model = load_model(spec, weights=str(tmp_path / "w.pt")).model
    shape = (1, 3, 32, 32)
    graph = analyze(model, shape)
    assert {"classifier.4", "aux_classifier.4"} <= set(graph.skipped)  # both outputs' classes are protected
    crit = create("l1")
    crit.prepare(model, graph, ScoreContext(seed=0))
    plan = select(graph, crit, PlanConfig(ratio=0.5, round_to=8))
    prune_channels(model, graph, plan)
    save_pruned(tmp_path / "pruned.pt", model, arch=spec, num_classes=3, input_shape=shape, plan=plan)
    back = load_model(str(tmp_path / "pruned.pt")).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), back(x)
    assert list(got) == ["out", "aux"] and got["aux"].shape == (2, 3, 32, 32)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_the_sensitivity_sweep_refuses_dense_outputs() -> None:
    from deploy_prune.sensitivity import sensitivity

    with pytest.raises(BadInput, match="returns seg, aux rather than one logits tensor"):
        sensitivity(DictHeads(cin=1).eval(), None, (1, 1, 28, 28))
