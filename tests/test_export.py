"""export_onnx / check_onnx / cleanup_onnx / parity on tiny real models (real exporter, graphsurgeon and ORT)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from torch.nn.utils import prune

from deploy_prune.errors import DeployPruneError
from deploy_prune.export import check_onnx, cleanup_onnx, export_onnx, onnx_size, parity, sidecar_of

SHAPE = (1, 3, 16, 16)


def _give_bn_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial eval-mode BN statistics, so outputs are of order 1 (docs/onnx-runtime.md §8)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
    return model


class TwoConvCNN(nn.Module):
    """conv-BN-ReLU ×2, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class ResidualNet(nn.Module):
    """A stem and one residual block with an element-wise add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Histc(nn.Module):
    """A model the exporter cannot translate (aten.histc with min == max)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=4)


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Each tiny model exported once per module, each into its own folder (to spot stray sidecars)."""
    torch.manual_seed(0)
    out: dict[str, tuple[nn.Module, Path]] = {}
    cnn = _give_bn_statistics(TwoConvCNN(), 1)
    cnn.train()  # export must work from train mode and give it back
    models = {
        "cnn": cnn,
        "residual": _give_bn_statistics(ResidualNet(), 2).eval(),
        "fx": torch.fx.symbolic_trace(_give_bn_statistics(TwoConvCNN(), 3).eval()),
    }
    for name, model in models.items():
        path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
        export_onnx(model, path, torch.randn(*SHAPE))
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["cnn", "residual", "fx"])
def test_export_is_one_checked_file_with_dynamic_batch(exported: dict, name: str) -> None:
    model, path = exported[name]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .onnx.data sidecar
    check_onnx(path)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded by the exporter
    for batch in (1, 3):
        y = _ort_run(path, np.random.default_rng(batch).standard_normal((batch, *SHAPE[1:]), dtype=np.float32))
        assert y.shape[0] == batch


class ClassToken(nn.Module):
    """ViT's pattern: a learned token expanded to the batch size and concatenated, then a 3-D linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.mlp(x)[:, 0])


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)


def test_export_from_batch_one_keeps_batch_dynamic_under_ort_optimizations(tmp_path: Path) -> None:
    # torch.export specializes a size-1 example dim; ORT then fuses MatMul->Gemm with a static Reshape and
    # batch 3 fails. The export must trace with a batch of 2 so the file runs at any batch size.
    torch.manual_seed(0)
    model = ClassToken().eval()
    path = tmp_path / "tok.onnx"
    export_onnx(model, path, torch.randn(*SHAPE))
    x = np.random.default_rng(0).standard_normal((3, *SHAPE[1:]), dtype=np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_export_refuses_a_fixed_batch_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(DeployPruneError, match="batch dimension") as info:
        export_onnx(FixedBatch(), tmp_path / "f.onnx", torch.randn(*SHAPE))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "f.onnx").exists()


def test_large_weights_go_to_one_sidecar_that_cleanup_and_parity_follow(tmp_path: Path) -> None:
    # forced here on a tiny model; by default this happens above protobuf's 2 GiB limit (RegNet-Y-128GF)
    torch.manual_seed(0)
    model = _give_bn_statistics(TwoConvCNN(), 4).eval()
    raw, clean = tmp_path / "raw" / "m.onnx", tmp_path / "m.onnx"
    export_onnx(model, raw, torch.randn(*SHAPE), external_data=True)
    assert sidecar_of(raw).exists()
    cleanup_onnx(raw, clean)
    assert sidecar_of(clean).exists() and onnx_size(clean) > clean.stat().st_size
    proto = onnx.load(str(clean), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}  # named after the cleaned file, not the raw one
    check_onnx(clean)
    cleanup_onnx(clean, clean)  # in place: the sidecar is rewritten, not lost
    x = np.random.default_rng(0).standard_normal((2, *SHAPE[1:]), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort_run(clean, x), want, rtol=1e-4, atol=1e-5)
    assert parity(clean, model, [torch.from_numpy(x)])["ok"]


def test_small_model_has_no_sidecar(exported: dict) -> None:
    _, path = exported["cnn"]
    assert not sidecar_of(path).exists() and onnx_size(path) == path.stat().st_size


def test_export_restores_train_mode(exported: dict) -> None:
    model, _ = exported["cnn"]
    assert model.training


def test_export_refuses_pruning_reparametrization(tmp_path: Path) -> None:
    model = TwoConvCNN().eval()
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)
    with pytest.raises(DeployPruneError, match=r"prune\.remove"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(*SHAPE))
    assert not (tmp_path / "m.onnx").exists()


def test_export_failure_is_one_line_with_captured_log(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DeployPruneError) as info:
        export_onnx(Histc(), tmp_path / "h.onnx", torch.randn(2, 4))
    message = str(info.value)
    assert "\n" not in message and "histc" in message
    assert "Translate the graph into ONNX" in "".join(info.value.__notes__)
    captured = capsys.readouterr()
    assert "[torch.onnx]" not in captured.out + captured.err  # the exporter's chatter was captured


def test_check_onnx_rejects_invalid_model(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad", [x], [y])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    with pytest.raises(DeployPruneError, match="not a valid ONNX model"):
        check_onnx(path)


# ----------------------------------------------------------------------------------------------------------
# cleanup


def _identity_model(path: Path) -> None:
    """input → Identity → Conv(Identity(W) * 2) → Identity → Relu → Identity → logits, at IR 10.

    Covers an Identity on the graph input, one on a foldable weight path, one mid-graph and one that
    produces the graph output.
    """
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    scale = numpy_helper.from_array(np.array([2.0], dtype=np.float32), "s")
    nodes = [
        helper.make_node("Identity", ["input"], ["x0"]),
        helper.make_node("Identity", ["W"], ["W1"]),
        helper.make_node("Mul", ["W1", "s"], ["W2"]),
        helper.make_node("Conv", ["x0", "W2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("Identity", ["r"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "identities",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [weight, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_cleanup_removes_identities_keeps_outputs_and_ir(tmp_path: Path) -> None:
    src, dst, again = tmp_path / "src.onnx", tmp_path / "clean.onnx", tmp_path / "clean2.onnx"
    _identity_model(src)
    stats = cleanup_onnx(src, dst)
    assert stats["op_counts_before"]["Identity"] == 4
    assert "Identity" not in stats["op_counts_after"]
    assert stats["nodes_after"] < stats["nodes_before"]
    assert stats["op_counts_after"] == {"Conv": 1, "Relu": 1}  # Identity(W) * 2 was folded into the weight

    cleaned = onnx.load(str(dst))
    assert cleaned.ir_version == 10  # not graphsurgeon's default IR 14, which ORT 1.31 refuses
    assert [(o.domain, o.version) for o in cleaned.opset_import] == [("", 18)]
    assert [i.name for i in cleaned.graph.input] == ["input"]
    assert [o.name for o in cleaned.graph.output] == ["logits"]

    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(_ort_run(src, x), _ort_run(dst, x))

    assert cleanup_onnx(dst, again)["nodes_after"] == stats["nodes_after"]  # idempotent


def test_cleanup_keeps_passthrough_identity(tmp_path: Path) -> None:
    """An Identity from graph input straight to graph output is the only way to express it: it stays."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "passthrough",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2])],
    )
    src, dst = tmp_path / "p.onnx", tmp_path / "p_clean.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(src))
    assert cleanup_onnx(src, dst)["nodes_after"] == 1
    np.testing.assert_array_equal(_ort_run(dst, np.array([1.0, -2.0], dtype=np.float32)), [1.0, -2.0])


def test_cleanup_of_exported_model_is_stable_and_in_place(exported: dict, tmp_path: Path) -> None:
    model, src = exported["residual"]
    dst = tmp_path / "residual.onnx"
    dst.write_bytes(src.read_bytes())
    first = cleanup_onnx(dst, dst)  # in place
    assert first["nodes_after"] <= first["nodes_before"]
    assert onnx.load(str(dst)).ir_version == onnx.load(str(src)).ir_version
    assert cleanup_onnx(dst, dst)["nodes_after"] == first["nodes_after"]
    assert parity(dst, model, [torch.randn(2, *SHAPE[1:])])["ok"]


@pytest.mark.parametrize("pool_padding", [0, 1])
def test_cleanup_keeps_ort_from_folding_a_zero_pad_into_maxpool(tmp_path: Path, pool_padding: int) -> None:
    # timm's BiT stem: conv, ConstantPad2d(1, 0), MaxPool2d(3, 2). A window of negative values gives 0 with the
    # zero padding; ONNX Runtime's PadFusion moves the padding into MaxPool, which pads with -inf.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConstantPad2d(1, 0.0),
                          nn.MaxPool2d(3, 2, padding=pool_padding)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    export_onnx(model, tmp_path / "raw.onnx", x)
    result = cleanup_onnx(tmp_path / "raw.onnx", tmp_path / "clean.onnx")
    assert result["maxpools_protected"] == 1
    nodes = onnx.load(str(tmp_path / "clean.onnx")).graph.node
    pool = next(n for n in nodes if n.op_type == "MaxPool")
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    assert "pads" not in attrs and attrs["auto_pad"] == b"VALID"
    assert [n.op_type for n in nodes].count("Pad") == 1 + pool_padding  # a -inf Pad carries the pool's own
    with torch.no_grad():
        want = model(x).numpy()
    assert (want == 0).any()  # some windows are all padding and negatives: where the fusion goes wrong
    session = ort.InferenceSession(str(tmp_path / "clean.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]  # default optimizations, PadFusion included
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert parity(tmp_path / "clean.onnx", model, [x])["ok"]
    assert cleanup_onnx(tmp_path / "clean.onnx", tmp_path / "again.onnx")["maxpools_protected"] == 0


# ----------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("name", ["cnn", "residual"])
def test_parity_ok_for_the_true_model(exported: dict, name: str) -> None:
    model, path = exported[name]
    result = parity(path, model, [torch.randn(1, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])])
    assert result["ok"], result
    assert result["ref_max_abs"] > 1e-3  # the outputs are not trivially tiny
    assert 0 <= result["max_abs_diff"] < 1e-4
    assert result["max_rel_diff"] == pytest.approx(result["max_abs_diff"] / result["ref_max_abs"])


def test_parity_detects_perturbed_weights(exported: dict) -> None:
    model, path = exported["cnn"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.conv2.weight.mul_(1.05)
    result = parity(path, other, [torch.randn(2, *SHAPE[1:])])
    assert not result["ok"]
    assert result["max_abs_diff"] > 1e-3


def test_parity_near_zero_output_is_not_silently_ok(tmp_path: Path) -> None:
    """Logits ~1e-12 would pass any absolute tolerance; parity must judge them relative to their scale."""
    tiny = _give_bn_statistics(TwoConvCNN(), 4).eval()
    with torch.no_grad():
        tiny.fc.weight.mul_(1e-12)
        tiny.fc.bias.zero_()
    path = tmp_path / "tiny.onnx"
    export_onnx(tiny, path, torch.randn(*SHAPE))
    x = [torch.randn(2, *SHAPE[1:])]
    result = parity(path, tiny, x)
    assert 0 < result["ref_max_abs"] < 1e-6
    assert result["note"] and "near zero" in result["note"]
    assert result["ok"]  # the same model: relative error at float32 rounding level
    assert result["max_rel_diff"] < 1e-3

    # A genuinely different tiny model: its absolute error is far below any fixed atol, yet it must fail.
    wrong = copy.deepcopy(tiny)
    with torch.no_grad():
        wrong.conv2.weight.mul_(1.05)
    bad = parity(path, wrong, x)
    assert bad["max_abs_diff"] < 1e-6
    assert not bad["ok"]

    # An output that is exactly zero proves nothing by itself, even though ORT matches it exactly: the graph is
    # then checked at the classifier's input (tests/test_hardening.py covers the cases where it cannot be).
    with torch.no_grad():
        tiny.fc.weight.zero_()
    zero_path = tmp_path / "zero.onnx"
    export_onnx(tiny, zero_path, torch.randn(*SHAPE))
    zero = parity(zero_path, tiny, [torch.randn(2, *SHAPE[1:])])
    assert zero["max_abs_diff"] == 0.0 and zero["ok"] and zero["head_input"]["ok"]
    wrong_zero = copy.deepcopy(tiny)
    with torch.no_grad():
        wrong_zero.conv2.weight.mul_(1.05)
    assert not parity(zero_path, wrong_zero, [torch.randn(2, *SHAPE[1:])])["ok"]
