"""Per-layer sensitivity sweep (Li et al. Fig. 2b) against an independent zero-the-filters reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from deploy_prune.sensitivity import plot_sensitivity, ratios_from_sensitivity, sensitivity
from deploy_prune.data import DataBundle, load_data
from deploy_prune.errors import BadInput
from deploy_prune.train import train

FRACTIONS = (0.25, 0.5, 0.75)


class Net(nn.Module):
    """No BN: removing a filter (and its bias) is exactly zeroing its output, since ReLU(0) = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, DataBundle]:
    full = load_data("mnist5k", batch_size=100, seed=0)
    data = DataBundle(DataLoader(Subset(full.train.dataset, range(0, 4000, 4)), batch_size=50, shuffle=True,
                                 generator=torch.Generator().manual_seed(0)),
                      DataLoader(Subset(full.val.dataset, range(0, 1000, 4)), batch_size=125), 10,
                      full.input_shape, "mnist5k-subset")
    torch.manual_seed(0)
    model = Net()
    train(model, data.train, epochs=1, lr=0.05, progress=False)
    return model, data


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * hits / n


def test_sensitivity_matches_zeroing_the_lowest_l1_filters(setup: tuple[nn.Module, DataBundle]) -> None:
    model, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sensitivity(model, data, (1, 1, 28, 28), criterion="l1", fractions=FRACTIONS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not modified
    assert result["criterion"] == "l1"
    assert result["baseline"] == pytest.approx(accuracy(copy.deepcopy(model), data.val))
    assert list(result["layers"]) == ["c1", "c2"]  # fc writes the output: not a group
    for name in ("c1", "c2"):
        entry = result["layers"][name]
        assert entry["modules"] == [name] and entry["fractions"] == list(FRACTIONS) and entry["size"] == 8
        layer = getattr(model, name)
        l1 = np.abs(layer.weight.detach().numpy()).reshape(8, -1).sum(axis=1)
        for f, acc, removed in zip(FRACTIONS, entry["accuracy"], entry["removed"]):
            n_remove = 8 - int(8 * (1 - f))
            assert removed == n_remove
            ref = copy.deepcopy(model)
            idx = torch.tensor(np.argsort(l1, kind="stable")[:n_remove])
            with torch.no_grad():
                getattr(ref, name).weight[idx] = 0.0
                getattr(ref, name).bias[idx] = 0.0
            assert acc == pytest.approx(accuracy(ref, data.val))
    # pruning more of a layer costs accuracy overall on this trained model
    assert result["layers"]["c1"]["accuracy"][-1] < result["baseline"]


def test_sensitivity_with_a_data_criterion_and_bad_fractions(setup: tuple[nn.Module, DataBundle]) -> None:
    model, data = setup
    result = sensitivity(model, data, (1, 1, 28, 28), criterion="apoz", fractions=(0.5,), max_batches=1)
    assert set(result["layers"]) == {"c1", "c2"}
    assert all(len(e["accuracy"]) == 1 and 0.0 <= e["accuracy"][0] <= 100.0 for e in result["layers"].values())
    with pytest.raises(BadInput, match="fractions"):
        sensitivity(model, data, (1, 1, 28, 28), fractions=(0.0, 1.0))


def test_ratios_take_the_largest_fraction_within_the_drop() -> None:
    result = {"baseline": 90.0, "layers": {
        "a": {"modules": ["a"], "fractions": [0.1, 0.2, 0.3], "accuracy": [89.5, 88.0, 89.8]},
        "b (+1 coupled)": {"modules": ["b", "b_short"], "fractions": [0.1, 0.2, 0.3],
                           "accuracy": [89.9, 89.2, 89.0]},
        "c": {"modules": ["c"], "fractions": [0.1, 0.2], "accuracy": [85.0, 89.0]},
    }}
    # a: fails at 0.2, and the later recovery at 0.3 does not count; b: all within; c: fails at once
    assert ratios_from_sensitivity(result, max_drop=1.0) == {"a": 0.1, "b": 0.3, "b_short": 0.3, "c": 0.0}
    assert ratios_from_sensitivity(result, max_drop=5.0) == {"a": 0.3, "b": 0.3, "b_short": 0.3, "c": 0.2}


def test_plot_sensitivity_writes_a_png(tmp_path) -> None:
    result = {"criterion": "l1", "baseline": 90.0, "layers": {
        "c1": {"modules": ["c1"], "fractions": [0.5, 0.9], "accuracy": [80.0, 20.0]},
        "c2": {"modules": ["c2"], "fractions": [0.5, 0.9], "accuracy": [88.0, 70.0]}}}
    png = plot_sensitivity(result, tmp_path / "sens.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
