"""A tiny real-digit imagefolder for the distributed and resume tests (import the fixture from here)."""

from __future__ import annotations

from pathlib import Path

import pytest


def make_digit_folder(root: Path, train_per_class: int, val_per_class: int = 2) -> Path:
    """A tiny ``imagefolder`` of real digits (from the mnist5k arrays), 10 classes, 28x28 grayscale PNGs."""
    from PIL import Image

    from deploy_prune.data import _mnist5k_arrays

    pixels, labels = _mnist5k_arrays()
    seen: dict[int, int] = {}
    for i, c in enumerate(labels.tolist()):
        k = seen.get(c, 0)
        if k >= train_per_class + val_per_class:
            continue
        seen[c] = k + 1
        d = root / ("train" if k < train_per_class else "val") / str(c)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i].reshape(28, 28)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 training and 20 validation digits as ``imagefolder:DIR`` (use ``--input-shape 1x1x28x28``)."""
    return make_digit_folder(tmp_path_factory.mktemp("tiny-digits"), 8)
