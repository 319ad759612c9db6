"""Each criterion's choice checked against an independent reference (numpy or explicit loops) on hand-built
weights and activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from deploy_prune.criteria import ScoreContext, create, make_options, names
from deploy_prune.criteria.apoz import NO_RELU, APoZOptions
from deploy_prune.criteria.fpgm import distance_sums
from deploy_prune.criteria.l1 import L1Options, filter_l1
from deploy_prune.criteria.slimming import SlimmingOptions, plot_gamma_hist
from deploy_prune.data import DataBundle
from deploy_prune.errors import BadInput
from deploy_prune.surgery import PlanConfig, analyze, prune_channels, select
from deploy_prune.train.sparsity import sparsity_training


def choose(model: nn.Module, shape: tuple[int, ...], criterion: str, ratio: float, *, ctx: ScoreContext | None = None,
           options: object = None, **cfg: float) -> dict[str, list[int]]:
    """Run analysis + criterion + planner; return {layer: removed output indices}."""
    graph = analyze(model, shape)
    crit = create(criterion, options)
    crit.prepare(model, graph, ctx or ScoreContext())
    return select(graph, crit, PlanConfig(ratio=ratio, **cfg)).removed()


def lowest(values: np.ndarray, k: int) -> list[int]:
    return sorted(np.argsort(values, kind="stable")[:k].tolist())


def bundle(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> DataBundle:
    ds = TensorDataset(x, y)
    return DataBundle(DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size),
                      int(y.max()) + 1, (1, *x.shape[1:]), "test")


class Chain(nn.Module):
    """c1 -> relu -> c2 -> relu -> flatten -> fc1 -> relu -> fc2 (fc2 reaches the output, so is not pruned)."""

    def __init__(self, c_in: int = 1, c1: int = 3, c2: int = 2, k: int = 1, side: int = 2) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c1, k, padding=k // 2)
        self.c2 = nn.Conv2d(c1, c2, k, padding=k // 2)
        self.fc1 = nn.Linear(c2 * side * side, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Residual(nn.Module):
    """stem -> [conv_a -> conv_b] + shortcut -> relu -> pool -> fc; the shortcut's attribute name is a parameter."""

    def __init__(self, shortcut_name: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 6, 3, padding=1)
        setattr(self, shortcut_name, nn.Conv2d(4, 6, 1))
        self.shortcut_name = shortcut_name
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        out = self.conv_b(torch.relu(self.conv_a(h))) + getattr(self, self.shortcut_name)(h)
        return self.fc(torch.relu(out).mean(dim=(2, 3)))


def seeded_(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


# ---------------------------------------------------------------------------------------------------------
# registry


def test_registry_lists_all_six_and_rejects_unknown() -> None:
    assert names() == ["l1", "slimming", "fpgm", "apoz", "lottery", "random"]
    for n in names():
        c = create(n)
        assert c.name == n and c.scope in ("local", "global")
    assert create("slimming").scope == "global"
    assert create("apoz").needs_data and create("lottery").needs_data and not create("l1").needs_data
    with pytest.raises(BadInput, match="unknown criterion"):
        create("l2")
    with pytest.raises(BadInput, match="l1_mode"):
        create("l1", L1Options(l1_mode="lazy"))
    with pytest.raises(BadInput, match="sparsity is for slimming"):
        make_options("l1", {"sparsity": 1e-3})
    with pytest.raises(BadInput, match="takes L1Options"):
        from deploy_prune.spec import PruneSpec

        PruneSpec(criterion="l1", options=SlimmingOptions())


# ---------------------------------------------------------------------------------------------------------
# l1


def test_l1_ranks_filters_by_absolute_weight_sum() -> None:
    model = seeded_(Chain(c_in=2, c1=8, c2=6, k=3, side=4), seed=0)
    plan = choose(model, (1, 2, 4, 4), "l1", 0.5)
    for name, n in (("c1", 8), ("c2", 6)):
        w = getattr(model, name).weight.detach().numpy()
        ref = np.array([sum(abs(float(v)) for v in w[j].ravel()) for j in range(n)])  # explicit loop
        assert plan[name] == lowest(ref, n - int(n * 0.5))
    assert "fc2" not in plan  # it writes the model output


def _greedy_flip_model() -> Chain:
    """c1 filter L1 = 0.1, 1, 2 (channel 0 goes first); c2 filter A leans on channel 0, B is spread out."""
    model = Chain(c_in=1, c1=3, c2=2, k=1, side=2)
    with torch.no_grad():
        model.c1.weight.copy_(torch.tensor([0.1, 1.0, 2.0]).reshape(3, 1, 1, 1))
        model.c2.weight.copy_(torch.tensor([[5.0, 0.1, 0.1], [0.5, 0.5, 0.5]]).reshape(2, 3, 1, 1))
    return model


def test_greedy_and_independent_l1_choose_differently() -> None:
    model = _greedy_flip_model()
    w1 = model.c1.weight.detach().numpy().reshape(3)
    w2 = model.c2.weight.detach().numpy().reshape(2, 3)
    # reference: c1 loses its smallest filter; c2 is scored with (greedy) or without (independent) excluding it
    gone_c1 = int(np.argmin(np.abs(w1)))
    independent = [sum(abs(w2[j, i]) for i in range(3)) for j in range(2)]
    greedy = [sum(abs(w2[j, i]) for i in range(3) if i != gone_c1) for j in range(2)]
    assert np.argmin(independent) != np.argmin(greedy)  # the case really flips
    ind = choose(model, (1, 1, 2, 2), "l1", 0.3, options=L1Options(l1_mode="independent"))
    gre = choose(model, (1, 1, 2, 2), "l1", 0.3, options=L1Options(l1_mode="greedy"))
    assert ind["c1"] == gre["c1"] == [gone_c1]
    assert ind["c2"] == [int(np.argmin(independent))]
    assert gre["c2"] == [int(np.argmin(greedy))]


def test_greedy_l1_drops_the_columns_of_a_removed_channel_in_a_linear_layer() -> None:
    model = seeded_(Chain(c_in=1, c1=3, c2=2, k=1, side=2), seed=3)
    graph = analyze(model, (1, 1, 2, 2))
    c2_group = next(g for g in graph.groups if g.modules == ("c2",))
    gone = c2_group.channels[1].root  # c2 channel 1 = fc1 input columns 4..7 after flatten
    w = model.fc1.weight.detach().numpy()
    ref = np.array([sum(abs(w[j, i]) for i in range(8) if not 4 <= i < 8) for j in range(4)])
    assert np.allclose(filter_l1(graph, "fc1", frozenset({gone})).numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("shortcut_name, is_projection", [("downsample", True), ("side", False)])
def test_l1_residual_group_uses_projection_shortcut_scores(shortcut_name: str, is_projection: bool) -> None:
    model = seeded_(Residual(shortcut_name), seed=1)
    with torch.no_grad():  # make the shortcut's ranking differ from conv_b's and from the sum
        getattr(model, shortcut_name).weight.copy_(torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1]).reshape(6, 1, 1, 1)
                                                   * torch.tensor([1.0, -1, 1, -1]).reshape(1, 4, 1, 1))
    plan = choose(model, (1, 1, 5, 5), "l1", 0.5)
    wb = model.conv_b.weight.detach().numpy()
    ws = getattr(model, shortcut_name).weight.detach().numpy()
    l1_b = np.abs(wb).reshape(6, -1).sum(axis=1)
    l1_s = np.abs(ws).reshape(6, -1).sum(axis=1)
    ref = l1_s if is_projection else l1_b + l1_s
    expected = lowest(ref, 3)
    assert plan["conv_b"] == plan[shortcut_name] == expected
    assert lowest(l1_s, 3) != lowest(l1_b + l1_s, 3)  # the two rules really disagree here


# ---------------------------------------------------------------------------------------------------------
# fpgm


def brute_force_distance_sums(w: np.ndarray) -> np.ndarray:
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    return np.array([sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(flat[i], flat[j])))
                         for j in range(len(flat))) for i in range(len(flat))])


def test_fpgm_matches_brute_force_on_raw_weights() -> None:
    model = seeded_(Chain(c_in=2, c1=6, c2=5, k=3, side=3), seed=2)
    plan = choose(model, (1, 2, 3, 3), "fpgm", 0.5)
    for name, n in (("c1", 6), ("c2", 5)):
        ref = brute_force_distance_sums(getattr(model, name).weight.detach().numpy())
        assert np.allclose(distance_sums(getattr(model, name).weight).numpy(), ref, rtol=1e-7)
        assert plan[name] == lowest(ref, n - int(n * 0.5))


def test_fpgm_uses_signed_weights_not_magnitudes() -> None:
    model = Chain(c_in=1, c1=5, c2=2, k=1, side=2)
    with torch.no_grad():
        model.c1.weight.copy_(torch.tensor([-3.0, -2, 1, 2, 3]).reshape(5, 1, 1, 1))
    raw = brute_force_distance_sums(model.c1.weight.detach().numpy())
    mag = brute_force_distance_sums(np.abs(model.c1.weight.detach().numpy()))
    assert lowest(raw, 1) != lowest(mag, 1)
    assert choose(model, (1, 1, 2, 2), "fpgm", 0.2)["c1"] == lowest(raw, 1) == [2]


def test_fpgm_sums_over_the_producers_of_a_residual_group() -> None:
    model = seeded_(Residual("downsample"), seed=4)
    plan = choose(model, (1, 1, 5, 5), "fpgm", 0.5)
    ref = (brute_force_distance_sums(model.conv_b.weight.detach().numpy())
           + brute_force_distance_sums(model.downsample.weight.detach().numpy()))
    assert plan["conv_b"] == plan["downsample"] == lowest(ref, 3)


# ---------------------------------------------------------------------------------------------------------
# slimming


class TwoBN(nn.Module):
    def __init__(self, extra_plain: bool = False) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 4, 1) if extra_plain else None  # a layer without BN
        self.fc = nn.Linear(4 if extra_plain else 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))
        if self.c3 is not None:
            x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


GAMMA1 = [-0.1, 0.2, 0.3, -0.4, 0.5, 0.6]  # signs: slimming ranks |gamma|
GAMMA2 = [0.7, 0.8, 0.05, 0.9, 1.0, 1.1]


def _two_bn(extra_plain: bool = False) -> TwoBN:
    model = TwoBN(extra_plain)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor(GAMMA1))
        model.bn2.weight.copy_(torch.tensor(GAMMA2))
    return model


def reference_slimming(gammas: dict[str, list[float]], ratio: float, max_layer_ratio: float = 0.9
                       ) -> dict[str, list[int]]:
    """Liu et al.: one global threshold over all |gamma|; each layer keeps at least ceil(n*(1-max_ratio))."""
    pool = sorted(abs(g) for gs in gammas.values() for g in gs)
    thr = pool[int(len(pool) * ratio) - 1]
    out = {}
    for layer, gs in gammas.items():
        below = [i for i, g in sorted(enumerate(gs), key=lambda t: abs(t[1])) if abs(g) <= thr]
        floor = max(1, math.ceil(len(gs) * (1 - max_layer_ratio)))
        out[layer] = sorted(below[:len(gs) - floor])
    return {k: v for k, v in out.items() if v}


def test_slimming_uses_one_global_threshold() -> None:
    plan = choose(_two_bn(), (1, 1, 4, 4), "slimming", 0.5)
    ref = reference_slimming({"c1": GAMMA1, "c2": GAMMA2}, 0.5)
    assert plan == ref == {"c1": [0, 1, 2, 3, 4], "c2": [2]}
    # a per-layer rule would have taken half of each layer instead
    assert choose(_two_bn(), (1, 1, 4, 4), "slimming", 0.5, layer_ratios={"c1": 0.5, "c2": 0.5}) == {
        "c1": [0, 1, 2], "c2": [0, 1, 2]}


def test_slimming_never_empties_a_layer_at_ratio_095() -> None:
    model = _two_bn()
    graph = analyze(model, (1, 1, 4, 4))
    crit = create("slimming")
    crit.prepare(model, graph, ScoreContext())
    plan = select(graph, crit, PlanConfig(ratio=0.95))
    prune_channels(model, graph, plan)
    assert plan.kept and all(len(k) >= max(1, math.ceil(plan.widths[n] * 0.1)) for n, k in plan.kept.items())
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)


def test_slimming_keeps_channels_without_batchnorm() -> None:
    model = _two_bn(extra_plain=True)
    graph = analyze(model, (1, 1, 4, 4))
    crit = create("slimming")
    crit.prepare(model, graph, ScoreContext())
    c3 = next(g for g in graph.groups if g.modules == ("c3",))
    assert torch.isinf(crit.score(graph, c3, frozenset())).all()
    c2 = next(g for g in graph.groups if g.modules == ("c2",))
    assert torch.allclose(crit.score(graph, c2, frozenset()), torch.tensor(GAMMA2).abs())
    assert "c3" not in select(graph, crit, PlanConfig(ratio=0.3)).kept


def test_slimming_max_over_the_batchnorms_of_a_coupled_channel() -> None:
    class ResBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bna = nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3)
            self.b, self.bnb = nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bna(self.a(x)) + self.bnb(self.b(x))).mean(dim=(2, 3)))

    model = ResBN()
    with torch.no_grad():
        model.bna.weight.copy_(torch.tensor([0.1, 0.9, -0.3]))
        model.bnb.weight.copy_(torch.tensor([0.5, 0.2, 0.2]))
    graph = analyze(model, (1, 1, 2, 2))
    crit = create("slimming")
    crit.prepare(model, graph, ScoreContext())
    assert torch.allclose(crit.score(graph, graph.groups[0], frozenset()), torch.tensor([0.5, 0.9, 0.3]))


def test_slimming_sparsity_step_adds_the_l1_subgradient(tmp_path) -> None:
    torch.manual_seed(0)
    model = _two_bn()
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    data = bundle(x, y, batch_size=8)  # one batch = one optimizer step
    lam, lr, wd = 0.05, 0.01, 1e-4
    # reference: one plain SGD step on gamma with grad = dL/dgamma + lam*sign(gamma) + wd*gamma
    ref_model = _two_bn()
    ref_model.load_state_dict(model.state_dict())
    ref_model.train()
    nn.functional.cross_entropy(ref_model(x), y).backward()
    g = ref_model.bn1.weight
    expected = (g - lr * (g.grad + lam * torch.sign(g) + wd * g)).detach()
    sparsity_training(model, data.train, sparsity=lam, epochs=1, lr=lr, progress=False)
    assert torch.allclose(model.bn1.weight.detach(), expected, atol=1e-7)
    # through the criterion: histograms before/after share the bins and count every BN channel
    model = _two_bn()
    graph = analyze(model, (1, 1, 4, 4))
    ctx = ScoreContext(data=data, progress=False)
    create("slimming", SlimmingOptions(sparsity=0.5, sparsity_epochs=3)).prepare(model, graph, ctx)
    hist = ctx.report["gamma_hist"]
    assert len(hist["bins"]) == len(hist["before"]) + 1 == len(hist["after"]) + 1
    assert sum(hist["before"]) == sum(hist["after"]) == 12
    assert hist["before"] != hist["after"] and hist["epochs"] == 3
    assert float(model.bn2.weight.detach().abs().mean()) < float(torch.tensor(GAMMA2).abs().mean())
    png = plot_gamma_hist(hist, tmp_path / "gamma.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slimming_without_data_prunes_the_trained_gammas() -> None:
    model = _two_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = analyze(model, (1, 1, 4, 4))
    ctx = ScoreContext()
    create("slimming").prepare(model, graph, ctx)
    assert ctx.report["gamma_hist"]["after"] is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# apoz


def _apoz_inputs() -> torch.Tensor:
    """(4, 3, 2, 2) inputs: channel 0 negative at 3 of 4 positions, channel 1 tiny but positive everywhere,
    channel 2 negative at 2 of 4 positions."""
    x = torch.empty(4, 3, 2, 2)
    gen = torch.Generator().manual_seed(0)
    for n in range(4):
        mag = torch.rand(3, 4, generator=gen) + 0.5
        x[n, 0] = (mag[0] * torch.tensor([-1.0, -1, -1, 1])[torch.randperm(4, generator=gen)]).reshape(2, 2)
        x[n, 1] = 1e-30
        x[n, 2] = (mag[2] * torch.tensor([-1.0, -1, 1, 1])[torch.randperm(4, generator=gen)]).reshape(2, 2)
    return x


def _apoz_model() -> Chain:
    model = seeded_(Chain(c_in=3, c1=3, c2=2, k=1, side=2), seed=5)
    with torch.no_grad():  # c1 passes its input through, so its pre-ReLU activations are the hand-built ones
        model.c1.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        model.c1.bias.zero_()
    return model


def test_apoz_counts_exact_zeros_after_relu() -> None:
    x = _apoz_inputs()
    model = _apoz_model()
    data = bundle(x, torch.zeros(4, dtype=torch.long), batch_size=2)
    post = np.maximum(x.numpy(), 0.0)
    ref_c1 = np.array([(post[:, c] == 0).mean() for c in range(3)])
    assert ref_c1.tolist() == [0.75, 0.0, 0.5]
    near_zero = np.array([(np.abs(post[:, c]) < 1e-6).mean() for c in range(3)])
    assert int(np.argmax(near_zero)) == 1  # a tolerance-based count would wrongly prune the tiny channel

    graph = analyze(model, (1, 3, 2, 2))
    relu_node = graph.groups[0].channels[0].relus[0][0]
    captured = graph.capture(x, [relu_node])[relu_node]  # the recorded node is the ReLU: its output is post-ReLU
    assert torch.equal(captured, torch.relu(x))

    ctx = ScoreContext(data=data)
    crit = create("apoz")
    crit.prepare(model, graph, ctx)
    c1 = next(g for g in graph.groups if g.modules == ("c1",))
    assert np.allclose(crit.score(graph, c1, frozenset()).numpy(), -ref_c1)
    assert select(graph, crit, PlanConfig(ratio=0.3)).removed()["c1"] == [0]
    # fc1 is a linear layer (M = 1): its APoZ is over images only
    with torch.no_grad():
        h = torch.relu(model.fc1(torch.relu(model.c2(torch.relu(model.c1(x)))).flatten(1))).numpy()
    fc1 = next(g for g in graph.groups if g.modules == ("fc1",))
    assert np.allclose(crit.score(graph, fc1, frozenset()).numpy(), -(h == 0).mean(axis=0))
    assert ctx.artifacts["apoz"]["images"] == 4 and ctx.artifacts["apoz"]["batches"] == 2
    assert ctx.artifacts["apoz"]["layer_mean"]["c1"] == pytest.approx(ref_c1.mean())


def test_apoz_leaves_channels_without_relu_unscored() -> None:
    class NoRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 3, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.b(nn.functional.gelu(self.a(x)))).mean(dim=(2, 3)))

    model = NoRelu()
    graph = analyze(model, (1, 1, 3, 3))
    ctx = ScoreContext(data=bundle(torch.randn(6, 1, 3, 3), torch.zeros(6, dtype=torch.long)))
    crit = create("apoz")
    crit.prepare(model, graph, ctx)
    a = next(g for g in graph.groups if g.modules == ("a",))
    assert torch.isinf(crit.score(graph, a, frozenset())).all()
    assert ctx.artifacts["apoz_unscored"] == [{"layer": "a", "channels": [0, 1, 2], "reason": NO_RELU}]
    b = next(g for g in graph.groups if g.modules == ("b",))
    assert torch.isfinite(crit.score(graph, b, frozenset())).all()


def test_apoz_without_data_is_a_bad_input() -> None:
    model = _apoz_model()
    graph = analyze(model, (1, 3, 2, 2))
    with pytest.raises(BadInput, match="apoz needs calibration data: pass data") as err:
        create("apoz").prepare(model, graph, ScoreContext())
    assert "pass --data mnist5k" in err.value.cli_message()


def test_apoz_calib_batches_limits_the_pass() -> None:
    x = _apoz_inputs()
    model = _apoz_model()
    graph = analyze(model, (1, 3, 2, 2))
    ctx = ScoreContext(data=bundle(x, torch.zeros(4, dtype=torch.long), batch_size=1))
    crit = create("apoz", APoZOptions(calib_batches=1))
    crit.prepare(model, graph, ctx)
    post = np.maximum(x.numpy()[:1], 0.0)
    c1 = next(g for g in graph.groups if g.modules == ("c1",))
    assert np.allclose(crit.score(graph, c1, frozenset()).numpy(),
                       [-(post[:, c] == 0).mean() for c in range(3)])
    assert ctx.artifacts["apoz"]["images"] == 1


# ---------------------------------------------------------------------------------------------------------
# random


def test_random_is_seeded() -> None:
    model = seeded_(Chain(c_in=1, c1=16, c2=16, k=1, side=2), seed=0)
    plans = {seed: choose(model, (1, 1, 2, 2), "random", 0.5, ctx=ScoreContext(seed=seed)) for seed in (1, 2)}
    again = choose(model, (1, 1, 2, 2), "random", 0.5, ctx=ScoreContext(seed=1))
    assert plans[1] == again
    assert plans[1] != plans[2]
    assert len(plans[1]["c1"]) == len(plans[1]["c2"]) == 8
    # the choice does not depend on the weights (it is a control), only on the seed
    other = seeded_(Chain(c_in=1, c1=16, c2=16, k=1, side=2), seed=9)
    assert choose(other, (1, 1, 2, 2), "random", 0.5, ctx=ScoreContext(seed=1)) == plans[1]


def test_every_criterion_gives_one_finite_or_inf_score_per_channel() -> None:
    model = seeded_(Residual("downsample"), seed=7)
    graph = analyze(model, (1, 1, 5, 5))
    data = bundle(torch.randn(4, 1, 5, 5), torch.zeros(4, dtype=torch.long))
    for name in names():
        crit = create(name, SlimmingOptions(sparsity_epochs=0) if name == "slimming" else None)
        crit.prepare(model, graph, ScoreContext(data=data))
        upstream = frozenset(ch.root for ch in graph.groups[0].channels[:1])  # as greedy L1 would pass it
        for g in graph.groups:
            for removed in (frozenset(), upstream):
                s = crit.score(graph, g, removed)
                assert s.shape == (g.size,) and not torch.isnan(s).any()
