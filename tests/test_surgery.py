"""Channel surgery on one tiny model per topology.

The central check is independent of the bookkeeping: before pruning, every weight that *reads* a channel we
are about to remove is set to zero, so those channels carry no signal. Removing them must then leave the
output unchanged (to float rounding). A wrong index anywhere — a concat offset, a split, flatten into linear,
a depthwise conv, a residual partner — breaks that equality.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deploy_prune.criteria import ScoreContext, create
from deploy_prune.errors import UnsupportedModel
from deploy_prune.export import export_onnx, parity
from deploy_prune.spec import PrunePlan
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, replay, roots_from_plan, select
from deploy_prune.surgery.graph import WHOLE_GROUPS_UP_TO


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws its weights and inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


def cbr(cin: int, cout: int, **kw: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class Plain(nn.Module):
    """conv-BN-ReLU x2, flatten straight into a linear layer (each channel is 16 linear inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(16, 16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.b(self.pool(self.a(x)))), 1))


class Residual3(nn.Module):
    """A residual add with three branches: x + f(x) + g(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.f = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.g = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(F.relu(x + self.f(x) + self.g(x)))


class Concat(nn.Module):
    """Inception/DenseNet-style: three branches concatenated, then a conv reading all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1, self.b2, self.b3 = cbr(8, 8), cbr(8, 16), cbr(8, 8)
        self.mix = cbr(8 + 8 + 16 + 8, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.mix(torch.cat([x, self.b1(x), self.b2(x), self.b3(x)], 1)))


class SplitShuffle(nn.Module):
    """ShuffleNet-V2-style: chunk in two, transform one half, concatenate, channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.branch = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16),
                                    nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.out = cbr(16, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(self.out(y))


class DepthwiseGrouped(nn.Module):
    """MobileNet-style inverted residual with a depthwise conv, plus a grouped conv (groups=4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(self.grouped(x))


class SE(nn.Module):
    """Squeeze-and-excitation: the excitation's output width is coupled to the block's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.body = cbr(16, 16)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.stem(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * s)


class Norms(nn.Module):
    """GroupNorm (kept widths stay divisible by its groups) and LayerNorm over a linear hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(F.relu(self.gn(self.conv(x))), 1).flatten(1)
        return self.fc2(F.gelu(self.ln(self.fc1(y))))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, permute to NHWC, LayerNorm, Linear-GELU-Linear, layer scale, residual."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean((2, 3)))


class HardCodedView(nn.Module):
    """A LeNet-style hard-coded reshape: the channels feeding it must be left alone (and say why)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 16)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(self.b(F.max_pool2d(self.a(x), 2)), 2)
        return self.fc(y.view(-1, 16 * 4 * 4))


class _StraightThroughClamp(torch.autograd.Function):
    """A custom autograd function (the kind Torch-Pruning's autograd tracing cannot follow)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad


class CustomAutograd(nn.Module):
    """conv blocks around a custom autograd function: fx records its element-wise forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = cbr(3, 16), cbr(16, 16), cbr(16, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(_StraightThroughClamp.apply(self.b(self.a(x)))))


class GhostSlice(nn.Module):
    """GhostNet's module: a primary conv, a cheap depthwise conv on its output, their concat sliced back to
    ``self.out_chs`` (odd here, so the slice cuts the last cheap channel and its bound must be rewritten), then a
    second ghost module whose slice keeps the whole concat (nothing to rewrite)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.primary, self.cheap = cbr(8, 8), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.out_chs = 15
        self.primary2, self.cheap2 = cbr(15, 8), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.out_chs2 = 16
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x1 = self.primary(x)
        y = torch.cat([x1, self.cheap(x1)], 1)[:, :self.out_chs]
        x2 = self.primary2(y)
        return self.head(torch.cat([x2, self.cheap2(x2)], 1)[:, :self.out_chs2, :, :])


class MixedSplit(nn.Module):
    """MixNet's ``MixedConv2d``: split at the stored ``self.splits``, a different conv per part, concatenate; and
    FasterNet's partial conv: split at two stored ints, convolve only the first part."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.splits = [6, 10]
        self.convs = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(10, 10, 5, padding=2,
                                                                                        groups=10)])
        self.pw = cbr(16, 16)
        self.dim_conv, self.dim_untouched = 4, 12
        self.partial = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        parts = torch.split(x, self.splits, 1)
        x = self.pw(torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], 1))
        a, b = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return self.head(x + torch.cat([self.partial(a), b], 1))


class Res2Split(nn.Module):
    """Res2Net's hierarchical split by one stored width (``split(out, self.width)``), each part added to the
    previous part's conv output; and CSPNet's split in halves of a stored ``expand_chs`` (``expand_chs // 2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 8
        self.conv1 = cbr(3, 3 * 8)
        self.convs = nn.ModuleList([cbr(8, 8), cbr(8, 8)])
        self.conv3 = cbr(24, 16)
        self.expand_chs = 16
        self.blocks = cbr(8, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv1(x), self.width, 1)
        sp = self.convs[0](spx[0])
        out = [sp]
        sp = self.convs[1](sp + spx[1])
        out += [sp, spx[2]]
        x = self.conv3(torch.cat(out, 1))
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        return self.head(torch.cat([xs, self.blocks(xb)], 1))


class Scale(nn.Module):
    """A MetaFormer layer scale: ``self.scale.view(self.shape)`` with the width stored in ``shape``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


class PoolMixer(nn.Module):
    """PoolFormer's attention-free token mixer (``pool(x) - x``) with layer scale, and SKNet's selective kernel:
    two paths stacked, summed for the attention, softmax across the paths, weighted sum over the paths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ls = Scale(16)
        self.paths = nn.ModuleList([cbr(16, 16), cbr(16, 16)])
        self.fc_reduce, self.fc_select = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 32, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.ls(self.pool(x) - x)
        x = torch.stack([p(x) for p in self.paths], dim=1)
        a = F.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True)))
        a = self.fc_select(a)
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c // 2, h, w), dim=1)
        return self.head(torch.sum(x * a, dim=1))


SHAPE = (1, 3, 16, 16)
MODELS = [Plain, Residual3, Concat, SplitShuffle, DepthwiseGrouped, SE, Norms, ConvNeXtBlock, HardCodedView,
          CustomAutograd]
# models whose every op is per-channel (no LayerNorm/GroupNorm mixing channels), for the silent-channel test
PER_CHANNEL = [Plain, Residual3, Concat, SplitShuffle, DepthwiseGrouped, SE, HardCodedView, CustomAutograd,
               GhostSlice, MixedSplit, Res2Split, PoolMixer]


def _trained_stats(model: nn.Module) -> nn.Module:
    """Give BN layers non-trivial statistics and put the model in eval mode (outputs of order 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *SHAPE[1:]))
    return model.eval()


def _removed(model: nn.Module, ratio: float, seed: int = 0, round_to: int = 1,
             whole_groups_up_to: int = WHOLE_GROUPS_UP_TO) -> tuple[object, PrunePlan]:
    graph = analyze(model, SHAPE, whole_groups_up_to=whole_groups_up_to)
    crit = create("random")
    crit.prepare(model, graph, ScoreContext(seed=seed))
    return graph, select(graph, crit, PlanConfig(ratio=ratio, round_to=round_to))


def _silence(model: nn.Module, graph, plan: PrunePlan) -> None:
    """Zero every weight that reads a channel ``plan`` removes (conv/linear inputs)."""
    removed = roots_from_plan(graph, plan)
    for c in graph.consumers:
        if c.role not in ("in", "grouped"):
            continue
        roots = graph.el.roots(c.labels)
        if c.role == "grouped":  # the weight's dim 1 indexes positions within a group
            m = graph.module(c.name)
            roots = roots[: m.in_channels // m.groups]
        cols = torch.tensor([i for i, r in enumerate(roots.tolist()) if r in removed], dtype=torch.long)
        if len(cols):
            with torch.no_grad():
                graph.module(c.name).weight.index_fill_(1, cols, 0.0)


@pytest.mark.parametrize("cls", PER_CHANNEL, ids=lambda c: c.__name__)
def test_removing_silent_channels_keeps_the_output(cls: type) -> None:
    model = _trained_stats(cls())
    graph, removed = _removed(model, 0.5)
    assert removed.kept, "expected something to prune"
    _silence(model, graph, removed)
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        before = model(x)
    prune_channels(model, graph, removed)
    with torch.no_grad():
        after = model(x)
    assert all(model.get_submodule(n).weight.shape[0] == len(k) for n, k in removed.kept.items())
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "regnet_y_400mf", "resnext50_32x4d"])
def test_removing_silent_channels_keeps_the_output_of_torchvision_models(name: str) -> None:
    # the real graphs: chunk + channel shuffle, grouped convs with squeeze-and-excitation, grouped bottlenecks
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    shape = (1, 3, 64, 64)
    graph = analyze(model, shape)
    crit = create("random")
    crit.prepare(model, graph, ScoreContext(seed=0))
    removed = select(graph, crit, PlanConfig(ratio=0.5))
    assert removed.kept
    _silence(model, graph, removed)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        before = model(x)
    prune_channels(model, graph, removed)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert all(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0 for m in grouped)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_pruned_model_runs_exports_and_matches_onnx(cls: type, tmp_path: Path) -> None:
    model = _trained_stats(cls())
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        ref_shape = model(x).shape
    params_before = sum(p.numel() for p in model.parameters())
    graph, removed = _removed(model, 0.5)
    prune_channels(model, graph, removed)
    with torch.no_grad():
        y = model(x)
    assert y.shape == ref_shape
    assert sum(p.numel() for p in model.parameters()) < params_before
    path = tmp_path / "m.onnx"
    export_onnx(model, path, torch.randn(*SHAPE))
    result = parity(path, model, [x])
    assert result["ok"], result


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_ratio_zero_changes_nothing(cls: type) -> None:
    model = _trained_stats(cls())
    ref = copy.deepcopy(model)
    graph, removed = _removed(model, 0.0)
    assert not removed.kept
    prune_channels(model, graph, removed)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_same_seed_same_channels_and_different_seed_differs() -> None:
    model = _trained_stats(Concat())
    plans = [_removed(copy.deepcopy(model), 0.5, seed=s)[1] for s in (3, 3, 4)]
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


def test_residual_branches_are_one_group_and_keep_the_same_indices() -> None:
    model = _trained_stats(Residual3())
    graph, removed = _removed(model, 0.5)
    group = next(g for g in graph.groups if "stem.0" in g.modules)
    assert set(group.modules) == {"stem.0", "f.1", "g.0"}
    prune_channels(model, graph, removed)
    changes = dict(removed.kept)
    assert changes["stem.0"] == changes["f.1"] == changes["g.0"]
    assert len(changes["stem.0"]) == 8


def test_se_excitation_width_follows_the_block() -> None:
    model = _trained_stats(SE())
    graph, removed = _removed(model, 0.5)
    group = next(g for g in graph.groups if "body.0" in g.modules)
    assert "fc2" in group.modules  # sigmoid(fc2(...)) multiplies body's channels one to one
    prune_channels(model, graph, removed)
    changes = dict(removed.kept)
    assert changes["body.0"] == changes["fc2"]


def test_group_norm_keeps_a_multiple_of_its_groups() -> None:
    model = _trained_stats(Norms())
    graph, removed = _removed(model, 0.6)
    gn_group = next(g for g in graph.groups if "conv" in g.modules)
    assert gn_group.multiple_of == 4
    prune_channels(model, graph, removed)
    assert model.gn.num_channels % 4 == 0
    assert model.conv.out_channels == model.gn.num_channels < 16


def test_grouped_conv_keeps_its_groups_and_prunes_the_same_positions_in_each() -> None:
    model = _trained_stats(DepthwiseGrouped())
    graph, removed = _removed(model, 0.5, whole_groups_up_to=0)  # 4 channels per group: pruned by positions
    assert "grouped" not in graph.skipped
    assert "output" in graph.skipped["head.2"]
    prune_channels(model, graph, removed)
    changes = dict(removed.kept)
    conv = model.grouped
    assert conv.groups == 4 and conv.in_channels == conv.out_channels == 8
    assert conv.weight.shape == (8, 2, 3, 3)
    # output j of group G is channel 4G + j: each group keeps the same relative positions
    per_group = [sorted(k % 4 for k in changes["grouped"] if k // 4 == g) for g in range(4)]
    assert all(p == per_group[0] for p in per_group) and len(per_group[0]) == 2
    # the input side too: the producer of the grouped conv's input kept the same positions in every group
    stem = changes["stem.0"]
    assert sorted({k % 4 for k in stem}) == sorted(k % 4 for k in stem if k < 4) and len(stem) == 8


class ChannelMultiplier(nn.Module):
    """A depthwise conv with two outputs per input channel (groups == in_channels < out_channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mult(self.stem(x)))


def test_channel_multiplier_conv_is_left_alone_with_a_reason() -> None:
    graph = analyze(_trained_stats(ChannelMultiplier()), SHAPE)
    assert "channel multiplier" in graph.skipped["mult"]
    assert "channel multiplier" in graph.skipped["stem.0"]


def test_chunk_and_shuffle_keep_both_halves_equal() -> None:
    model = _trained_stats(SplitShuffle())
    graph, removed = _removed(model, 0.5)
    assert not {"stem.0", "branch.5"} & set(graph.skipped)
    prune_channels(model, graph, removed)
    changes = dict(removed.kept)
    stem = set(changes["stem.0"])
    assert stem and all((j + 8) % 16 in stem for j in stem)  # chunk(2): position j of each half goes together
    branch = changes["branch.5"]
    # channel shuffle interleaves a[j] and branch[j]: both halves keep the same positions
    assert sorted(branch) == sorted(j for j in stem if j < 8)


class SplitByComputedSize(SplitShuffle):
    """``split`` by a size computed from the tensor's own width behaves like ``chunk(2)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.split(x.shape[1] // 2, dim=1)
        return self.head(self.out(torch.cat([a, self.branch(b)], 1)))


class SplitByLiteralSizes(SplitShuffle):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = torch.split(x, [8, 8], dim=1)
        return self.head(self.out(torch.cat([a, self.branch(b)], 1)))


def test_split_by_computed_size_is_coupled_and_by_literal_sizes_is_protected() -> None:
    model = _trained_stats(SplitByComputedSize())
    graph, removed = _removed(model, 0.5)
    assert "stem.0" not in graph.skipped
    prune_channels(model, graph, removed)
    changes = {n: set(k) for n, k in removed.kept.items()}
    assert all((j + 8) % 16 in changes["stem.0"] for j in changes["stem.0"])
    with torch.no_grad():
        assert model(torch.randn(2, *SHAPE[1:])).shape == (2, 5)
    literal = analyze(_trained_stats(SplitByLiteralSizes()), SHAPE)
    assert "split or sliced" in literal.skipped["stem.0"]


class HardCodedShuffle(SplitShuffle):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, _, h, w = y.size()
        y = y.view(n, 2, 8, h, w).transpose(1, 2).contiguous().view(n, 16, h, w)
        return self.head(self.out(y))


def test_shuffle_with_hard_coded_widths_is_protected() -> None:
    graph = analyze(_trained_stats(HardCodedShuffle()), SHAPE)
    assert "hard-coded" in graph.skipped["branch.5"]
    assert "hard-coded" in graph.skipped["stem.0"]


class SizedByOther(nn.Module):
    """A shuffle of ``proj``'s output sized by the width of its *input* (the Swin ``C // heads`` pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.proj = nn.Conv2d(16, 32, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        y = self.proj(x).view(b, 2, c, h, w).transpose(1, 2).reshape(b, 2 * c, h, w)
        return self.head(y)


def test_reshape_sized_by_another_tensor_protects_both() -> None:
    graph = analyze(_trained_stats(SizedByOther()), SHAPE)
    assert "another tensor" in graph.skipped["proj"]
    assert "another tensor" in graph.skipped["stem.0"]


def test_kept_count_rounds_channels_and_group_widths() -> None:
    from deploy_prune.surgery import kept_count

    cfg = PlanConfig(ratio=0.5, round_to=8)
    # classes of 4 channels each in ordinary layers (coupled halves): 6 classes = 24 channels is enough
    assert kept_count(12, 0.5, cfg, per_class=4) == 6
    # classes spanning the groups of a grouped conv: the class count is each group's width and is rounded,
    # 120 -> 60 -> 64 per group (RegNet-X-8GF ran faster with 64 per group than with 60)
    assert kept_count(120, 0.5, cfg, per_class=6, grouped=True) == 64
    assert kept_count(8, 0.5, cfg, per_class=13, grouped=True) == 8  # one 8-wide block per group: untouched


def test_narrow_grouped_conv_loses_whole_groups_and_keeps_its_output() -> None:
    # 4 channels per group, at most WHOLE_GROUPS_UP_TO: each conv group is one class (its 4 inputs and 4 outputs)
    model = _trained_stats(DepthwiseGrouped())
    graph, removed = _removed(model, 0.5)
    group = next(g for g in graph.groups if "grouped" in g.modules)
    assert not group.grouped and group.size == 4 and group.channels_per_class == 4
    assert "stem.0" in group.modules  # the producer of the grouped conv's input goes with it, group by group
    _silence(model, graph, removed)
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        before = model(x)
    prune_channels(model, graph, removed)
    conv = model.grouped
    assert conv.groups == 2 and conv.in_channels == conv.out_channels == 8
    assert conv.weight.shape == (8, 4, 3, 3)  # each group keeps its width
    kept = dict(removed.kept)
    # the kept outputs are whole groups (channel 4G + j of group G), and the kept inputs are the same groups
    out_groups = {k // 4 for k in kept["grouped"]}
    assert sorted(kept["grouped"]) == [4 * G + j for G in sorted(out_groups) for j in range(4)]
    assert {k // 4 for k in kept["stem.0"]} == out_groups
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_grouped_conv_keeps_round_to_channels_per_group() -> None:
    model = _trained_stats(DepthwiseGrouped())
    graph = analyze(model, SHAPE, whole_groups_up_to=0)
    group = next(g for g in graph.groups if "grouped" in g.modules)
    assert group.grouped and group.channels_per_class == 4
    crit = create("random")
    crit.prepare(model, graph, ScoreContext(seed=0))
    removed = select(graph, crit, PlanConfig(ratio=0.5, round_to=2))
    prune_channels(model, graph, removed)
    assert (model.grouped.out_channels // model.grouped.groups) % 2 == 0


def test_hard_coded_reshape_is_protected() -> None:
    model = _trained_stats(HardCodedView())
    graph, removed = _removed(model, 0.5)
    assert "hard-coded" in graph.skipped["b.0"]
    prune_channels(model, graph, removed)
    assert model.b[0].out_channels == 16 and model.a[0].out_channels == 4


def test_layer_scale_parameter_is_sliced_with_its_channels() -> None:
    model = _trained_stats(ConvNeXtBlock())
    graph, removed = _removed(model, 0.5)
    prune_channels(model, graph, removed)
    assert model.gamma.shape[0] == model.stem.out_channels == model.dw.out_channels == model.norm.normalized_shape[0]
    assert model.pw1.out_features == 32


def test_round_to_rounds_kept_counts() -> None:
    model = _trained_stats(Plain())
    graph, removed = _removed(model, 0.3, round_to=8)  # int(16 * 0.7) = 11 -> rounds to 8
    prune_channels(model, graph, removed)
    assert model.a[0].out_channels == 8 and model.b[0].out_channels == 8


def test_replay_rebuilds_the_same_network() -> None:
    model = _trained_stats(Concat())
    graph, plan = _removed(model, 0.5)
    fresh = copy.deepcopy(model)
    prune_channels(model, graph, plan)
    replay(fresh, SHAPE, PrunePlan.from_json(plan.to_json()))  # the plan survives a JSON round trip
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_untraceable_model_names_the_problem() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent Python control flow
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(UnsupportedModel, match="cannot trace"):
        analyze(DataDependent(), SHAPE)


def test_wrong_input_shape_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedModel, match="input_shape") as err:
        analyze(Plain(), (1, 1, 16, 16))
    assert "--input-shape" in err.value.cli_message()


def test_kept_count_follows_li_truncation_and_rounding() -> None:
    from deploy_prune.surgery import kept_count

    assert kept_count(16, 0.1, PlanConfig(ratio=0.1)) == 14  # int(16 * 0.9) = 14, as in Li et al.'s code
    assert kept_count(64, 0.5, PlanConfig(ratio=0.5, round_to=16)) == 32
    assert kept_count(64, 0.45, PlanConfig(ratio=0.45, round_to=16)) == 32  # int(35.2) = 35 -> nearest 16: 32
    assert kept_count(8, 0.5, PlanConfig(ratio=0.5, round_to=16)) == 8  # smaller than one block: untouched
    assert kept_count(10, 0.99, PlanConfig(ratio=0.99, max_layer_ratio=0.5)) == 5
    assert kept_count(3, 0.99, PlanConfig(ratio=0.99, max_layer_ratio=0.999)) == 1  # never empty
    assert kept_count(24, 0.5, PlanConfig(ratio=0.5), multiple_of=8) == 16  # GroupNorm(8 groups)


def test_ignore_protects_a_layer_and_says_so() -> None:
    model = _trained_stats(Plain())
    graph = analyze(model, SHAPE, ignore=["b."])
    assert graph.skipped["b.0"].startswith("ignored")
    crit = create("l1")
    crit.prepare(model, graph, ScoreContext())
    prune_channels(model, graph, select(graph, crit, PlanConfig(ratio=0.5)))
    assert model.b[0].out_channels == 16 and model.a[0].out_channels == 8


def test_global_scope_normalises_each_layer_before_ranking() -> None:
    model = _trained_stats(Plain())
    with torch.no_grad():
        model.a[0].weight.mul_(100.0)  # every filter of layer a now has a far larger L1 norm than layer b's
    graph = analyze(model, SHAPE)
    crit = create("l1")
    crit.prepare(model, graph, ScoreContext())
    plan = select(graph, crit, PlanConfig(ratio=0.5, scope="global", max_layer_ratio=0.9))
    prune_channels(model, graph, plan)
    after = {n: plan.width_after(n) for n in ("a.0", "b.0")}
    # 16 of the 32 channels go in total, and the raw 100x gap does not empty layer b: divided by its mean, each
    # layer's scores compete on the same footing, so both layers lose channels
    assert sum(16 - a for a in after.values()) == 16
    assert 0 < after["a.0"] < 16 and 0 < after["b.0"] < 16
    assert model.a[0].out_channels == after["a.0"] and model.b[0].out_channels == after["b.0"]
    local = _trained_stats(Plain())
    g2 = analyze(local, SHAPE)
    c2 = create("l1")
    c2.prepare(local, g2, ScoreContext())
    plan2 = select(g2, c2, PlanConfig(ratio=0.5))
    assert {plan2.width_after(n) for n in ("a.0", "b.0")} == {8}


STORED_SIZES = {GhostSlice: {"out_chs"}, MixedSplit: {"splits", "dim_conv", "dim_untouched"},
                Res2Split: {"width", "expand_chs"}, PoolMixer: {"ls.shape"}}


@pytest.mark.parametrize("cls", list(STORED_SIZES), ids=lambda c: c.__name__)
def test_stored_split_sizes_are_rewritten_and_replayed(cls: type) -> None:
    model = _trained_stats(cls())
    graph, plan = _removed(model, 0.5)
    assert set(graph.skipped) == {"head.2"}, graph.skipped  # only the classifier is left alone
    fresh = copy.deepcopy(model)
    prune_channels(model, graph, plan)
    sites = {(s.owner + "." if s.owner else "") + s.attr for s in graph.size_sites}
    assert STORED_SIZES[cls] <= sites
    # the rewritten sizes are the surviving widths: every part kept something and the forward runs
    if cls is MixedSplit:
        assert model.splits == [model.convs[0].out_channels, model.convs[1].out_channels]
        assert model.dim_conv == model.partial.in_channels and model.dim_conv + model.dim_untouched == \
            model.pw[0].out_channels
    if cls is Res2Split:
        assert model.width == model.convs[0][0].out_channels and model.conv1[0].out_channels == 3 * model.width
        assert model.expand_chs == model.conv3[0].out_channels
    if cls is GhostSlice:
        assert model.out_chs2 == 16  # a whole-width slice is left as it is
        assert model.out_chs == model.primary2[0].in_channels < 2 * model.primary[0].out_channels
    # replaying the plan on a fresh model rewrites the same attributes the same way (what pruned.pt relies on)
    replay(fresh, SHAPE, PrunePlan.from_json(plan.to_json()))
    fresh.load_state_dict(model.state_dict())
    for name in STORED_SIZES[cls]:
        owner, _, attr = name.rpartition(".")
        assert getattr(fresh.get_submodule(owner), attr) == getattr(model.get_submodule(owner), attr)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


class LiteralNotStored(nn.Module):
    """A slice bound that is a literal in the code, not a module attribute: nothing to rewrite, so protected."""

    def __init__(self) -> None:
        super().__init__()
        self.out_chs = 12  # the same number, but the forward does not read it
        self.a, self.b = cbr(3, 16), cbr(12, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)[:, :12]))


def test_a_literal_the_module_does_not_store_stays_protected() -> None:
    graph = analyze(_trained_stats(LiteralNotStored()), SHAPE)
    assert "split or sliced" in graph.skipped["a.0"]
    assert not graph.size_sites


class NarrowBranchIntoResidual(nn.Module):
    """Inception-ResNet: a concat of a 2-wide and a 14-wide branch added to a 16-wide residual stream, so the
    branches' channels are classes of one wide group; no layer may lose every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1, self.b2 = nn.Conv2d(16, 2, 1), nn.Conv2d(16, 14, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + torch.cat([self.b1(x), self.b2(x)], 1))


def test_no_layer_loses_every_channel() -> None:
    for seed in range(12):
        model = _trained_stats(NarrowBranchIntoResidual())
        graph, plan = _removed(model, 0.85, seed=seed)
        prune_channels(model, graph, plan)
        assert model.b1.out_channels >= 1 and model.b2.out_channels >= 1
        assert model.b1.out_channels + model.b2.out_channels == model.stem[0].out_channels == 2
