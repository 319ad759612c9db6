"""Lottery-ticket search: mask fractions, magnitude choice, rewinding to theta_0 / theta_k, masks held."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from deploy_prune.train.lottery import find_ticket
from deploy_prune.data import DataBundle, load_data
from deploy_prune.errors import BadInput
from deploy_prune.train import train

LR = 0.05


@pytest.fixture(scope="module")
def data() -> DataBundle:
    full = load_data("mnist5k", batch_size=64, seed=0)
    train_loader = DataLoader(Subset(full.train.dataset, range(0, 4000, 8)), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(Subset(full.val.dataset, range(0, 1000, 5)), batch_size=100)
    return DataBundle(train_loader, val_loader, 10, full.input_shape, "mnist5k-subset")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


WEIGHTS = {"1": (32, 784), "3": (10, 32)}
TOTAL = 32 * 784 + 10 * 32


def trained_copy(model: nn.Module, data: DataBundle) -> nn.Module:
    """The dense network after round 0's training (train() is deterministic for a seed)."""
    dense = copy.deepcopy(model)
    train(dense, data.train, epochs=1, lr=LR, seed=0, progress=False)
    return dense


def keep_top(values: np.ndarray, n_keep: int) -> np.ndarray:
    """Reference magnitude rule: keep the n_keep largest |w| (flat boolean mask)."""
    order = np.argsort(-np.abs(values), kind="stable")
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def test_global_ticket_masks_rewinds_and_holds_zeros(data: DataBundle) -> None:
    model = mlp()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    starts: dict[int, dict[str, torch.Tensor]] = {}
    result = find_ticket(model, data, target_sparsity=0.75, rounds=2, epochs_per_round=1, lr=LR, seed=0,
                         reinit_control=True, progress=False,
                         on_round=lambda r, m: starts.__setitem__(r, copy.deepcopy(m.state_dict())))
    assert all(torch.equal(v, theta0[k]) for k, v in model.state_dict().items())  # input untouched
    # the per-round rate follows (1 - p)^rounds = 1 - target, and the last round lands exactly on it
    assert result.rate_per_round == pytest.approx(0.5)
    assert [h["round"] for h in result.history] == [0, 1, 2]
    assert [h["sparsity"] for h in result.history] == pytest.approx([0.0, 0.5, 0.75], abs=1e-4)
    kept = sum(int(m.sum()) for m in result.masks.values())
    assert kept == round(0.25 * TOTAL)
    # round 1's mask = the largest half of the trained dense |w|, over both layers at once (global)
    dense = trained_copy(model, data)
    flat = np.concatenate([dense.state_dict()[f"{n}.weight"].numpy().ravel() for n in WEIGHTS])
    ref = keep_top(flat, TOTAL - round(0.5 * TOTAL))
    got = np.concatenate([(starts[1][f"{n}.weight"] != 0).numpy().ravel() for n in WEIGHTS])
    assert np.array_equal(got, ref)
    # every round starts from theta_0 on the survivors, zeros elsewhere; biases are rewound, never pruned
    for r in (1, 2):
        for k, v in starts[r].items():
            if k.endswith("weight") and r == 2:
                mask = result.masks[k.split(".")[0]]
                assert torch.equal(v, theta0[k] * mask)
            elif k.endswith("bias"):
                assert torch.equal(v, theta0[k])
    # after training: pruned weights are still exactly zero, survivors moved, plain parameters only
    final = result.model
    for n, mask in result.masks.items():
        w = final.get_submodule(n).weight
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert (w.detach()[~mask] == 0).all()
        assert not torch.equal(w.detach()[mask], theta0[f"{n}.weight"][mask])
    assert all("weight_orig" not in k and "weight_mask" not in k for k in final.state_dict())
    assert all(not m._forward_pre_hooks for m in final.modules())
    assert result.history[-1]["accuracy"] > 30.0  # a 75%-sparse MLP still learns
    assert result.reinit_accuracy is not None and 0.0 <= result.reinit_accuracy <= 100.0


def test_layer_scope_prunes_the_output_layer_at_half_rate(data: DataBundle) -> None:
    model = mlp()
    result = find_ticket(model, data, target_sparsity=0.5, rounds=1, scope="layer", epochs_per_round=1, lr=LR,
                         seed=0, progress=False)
    pruned = {n: 1.0 - float(m.float().mean()) for n, m in result.masks.items()}
    # r * (32*784) + r/2 * (10*32) = 0.5 * TOTAL
    r = 0.5 * TOTAL / (32 * 784 + 0.5 * 10 * 32)
    assert pruned["1"] == pytest.approx(r, abs=1 / (32 * 784))
    assert pruned["3"] == pytest.approx(r / 2, abs=1 / (10 * 32))
    assert result.history[-1]["sparsity"] == pytest.approx(0.5, abs=2 / TOTAL)
    # each layer keeps its own largest |w| of the trained dense weights
    dense = trained_copy(model, data)
    for n in WEIGHTS:
        w = dense.state_dict()[f"{n}.weight"].numpy().ravel()
        mask = result.masks[n].numpy().ravel()
        assert np.array_equal(mask, keep_top(w, int(mask.sum())))


def test_late_rewinding_resets_to_theta_k(data: DataBundle) -> None:
    model = mlp()
    k = 3
    starts: dict[int, dict[str, torch.Tensor]] = {}
    result = find_ticket(model, data, target_sparsity=0.5, rounds=1, rewind_iter=k, epochs_per_round=1, lr=LR,
                         seed=0, progress=False,
                         on_round=lambda r, m: starts.__setitem__(r, copy.deepcopy(m.state_dict())))
    # independent replay of the first k steps: the same seeded data order, plain SGD with momentum 0.9
    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    data.train.generator.manual_seed(0)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    for _, (x, y) in zip(range(k), data.train):
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    for name, v in ref.state_dict().items():
        assert torch.allclose(result.rewind_state[name], v, atol=1e-6)
        assert not torch.equal(result.rewind_state[name], model.state_dict()[name])
    for n, mask in result.masks.items():
        start = starts[1][f"{n}.weight"]
        assert torch.equal(start, result.rewind_state[f"{n}.weight"] * mask)
    with pytest.raises(BadInput, match="rewind_iter"):
        find_ticket(model, data, target_sparsity=0.5, rounds=1, rewind_iter=10_000, epochs_per_round=1, lr=LR,
                    progress=False)


@pytest.mark.parametrize("kwargs", [dict(target_sparsity=1.0), dict(target_sparsity=0.0), dict(rounds=0),
                                    dict(rate_per_round=1.5), dict(scope="row")])
def test_bad_lottery_parameters(data: DataBundle, kwargs: dict) -> None:
    args = dict(target_sparsity=0.5, rounds=1, epochs_per_round=0, progress=False) | kwargs
    with pytest.raises(BadInput):
        find_ticket(mlp(), data, **args)


def test_explicit_rate_never_overshoots_the_target(data: DataBundle) -> None:
    result = find_ticket(mlp(), data, target_sparsity=0.3, rounds=3, rate_per_round=0.2, epochs_per_round=0,
                         progress=False)
    # 0.2, then 0.36 would overshoot 0.3: rounds 2 and 3 stop at the target
    assert [h["sparsity"] for h in result.history] == pytest.approx([0.0, 0.2, 0.3, 0.3], abs=1e-4)
