"""imagefolder at scale: augmentation, workers, mixed image modes, unreadable images, image size, progress."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from deploy_prune.cli.main import main
from deploy_prune.data import LoaderOptions, load_data
from deploy_prune.errors import BadInput


def _img(rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _folder(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    """Every split holds RGB, grayscale, RGBA, palette-with-transparency, 16-bit and CMYK images."""
    rng = np.random.default_rng(0)
    makers = [
        lambda: _img(rng),
        lambda: _img(rng).convert("L"),
        lambda: _img(rng).convert("RGBA"),
        lambda: _img(rng).convert("P"),
        lambda: Image.fromarray(rng.integers(0, 65535, (30, 40)).astype(np.uint16)),
        lambda: _img(rng).convert("CMYK"),
    ]
    k = 0
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = makers[k % len(makers)]()
                k += 1
                if img.mode == "CMYK":
                    img.save(d / f"{i}.jpg")
                elif img.mode == "P":
                    img.save(d / f"{i}.png", transparency=0)
                else:
                    img.save(d / f"{i}.png")
    return root


def _batches(loader) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("channels", [3, 1])
def test_mixed_image_modes_load_as_the_models_channels(tmp_path: Path, channels: int) -> None:
    data = load_data(f"imagefolder:{_folder(tmp_path)}", batch_size=4, input_shape=(1, channels, 16, 16))
    for loader in (data.train, data.val):
        x, y = _batches(loader)
        assert x.shape == (9, channels, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_training_is_augmented_and_evaluation_is_not(tmp_path: Path) -> None:
    data = load_data(f"imagefolder:{_folder(tmp_path)}", batch_size=16, options=LoaderOptions(image_size=16))
    assert data.input_shape == (1, 3, 16, 16)
    v1, v2 = _batches(data.val), _batches(data.val)
    assert torch.equal(v1[0], v2[0])  # resize + centre crop: deterministic
    torch.manual_seed(0)
    t1 = data.train.dataset[0][0]
    torch.manual_seed(1)
    t2 = data.train.dataset[0][0]
    assert t1.shape == (3, 16, 16) and not torch.equal(t1, t2)  # random resized crop + flip


def test_workers_give_the_same_evaluation_data(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    one = load_data(f"imagefolder:{root}", batch_size=4, options=LoaderOptions(image_size=16))
    two = load_data(f"imagefolder:{root}", batch_size=4, options=LoaderOptions(image_size=16, workers=2))
    assert two.train.num_workers == 2 and two.val.num_workers == 2
    assert torch.equal(_batches(one.val)[0], _batches(two.val)[0])
    x, y = _batches(two.train)
    assert x.shape == (9, 3, 16, 16) and sorted(y.tolist()) == sorted(_batches(one.train)[1].tolist())


def test_an_unreadable_image_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    bad = root / "train" / "bee" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(BadInput) as exc:
        load_data(f"imagefolder:{root}", input_shape=(1, 3, 16, 16))
    assert str(bad) in str(exc.value) and "skip_bad_images" in str(exc.value) and "\n" not in str(exc.value)
    data = load_data(f"imagefolder:{root}", input_shape=(1, 3, 16, 16),
                     options=LoaderOptions(skip_bad_images=True))
    assert data.skipped_images == 1 and "train/bee/broken.jpg" in data.notes[0]
    assert len(data.train.dataset) == 9


def _truncated_jpeg(path: Path) -> None:
    _img(np.random.default_rng(1), (200, 200)).save(path, quality=90)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.7)])  # the header verifies, the data is cut


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_image_fails_at_decode_with_one_line_naming_it(tmp_path: Path, workers: int) -> None:
    root = _folder(tmp_path)
    bad = root / "val" / "ant" / "cut.jpg"
    _truncated_jpeg(bad)
    data = load_data(f"imagefolder:{root}", batch_size=32, input_shape=(1, 3, 16, 16),
                     options=LoaderOptions(workers=workers))
    with pytest.raises(BadInput) as exc:
        _batches(data.val)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value) and "skip_bad_images" in str(exc.value)
    skipping = load_data(f"imagefolder:{root}", batch_size=32, input_shape=(1, 3, 16, 16),
                         options=LoaderOptions(workers=workers, skip_bad_images=True))
    assert _batches(skipping.val)[0].shape == (10, 3, 16, 16)  # replaced by the next readable image


def test_image_size_and_input_shape_must_agree(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    with pytest.raises(BadInput, match="image_size 32 does not match input_shape"):
        load_data(f"imagefolder:{root}", input_shape=(1, 3, 16, 16), options=LoaderOptions(image_size=32))
    with pytest.raises(BadInput, match="workers"):
        LoaderOptions(workers=-1)


def test_the_loader_shows_images_per_second(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = load_data(f"imagefolder:{_folder(tmp_path)}", batch_size=4,
                     options=LoaderOptions(image_size=16, progress=True))
    assert _batches(data.val)[0].shape[0] == 9
    assert "img/s" in capsys.readouterr().err


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_cli_bad_data_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d")
    (root / "val" / "dog").mkdir()
    _img(np.random.default_rng(2)).save(root / "val" / "dog" / "0.png")
    base = ["run", "torchvision:resnet18", "--no-finetune", "-q", "--out", str(tmp_path / "o")]
    code, err = _run(base + ["--data", f"imagefolder:{root}"], capsys)
    assert code == 2 and err.startswith("error: ") and "different classes" in err and "dog" in err
    assert len(err.strip().splitlines()) == 1
    code, err = _run(base + ["--image-size", "32"], capsys)
    assert code == 2 and "--image-size" in err and "--data" in err
    assert not (tmp_path / "o").exists()


def test_cli_run_with_workers_image_size_and_skipped_images(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d")
    (root / "train" / "cat" / "junk.png").write_bytes(b"\x89PNG broken")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 3))
    torch.save(model, tmp_path / "tiny.pt")
    out = tmp_path / "bundle"
    code, err = _run(["run", str(tmp_path / "tiny.pt"), "--trust-pickle", "--data", f"imagefolder:{root}",
                      "--image-size", "24", "--workers", "2", "--skip-bad-images", "--epochs", "1",
                      "--round-to", "4", "--bench-iters", "2", "-q", "--out", str(out)], capsys)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["input_shape"] == [1, 3, 24, 24]
    assert any("1 unreadable image(s) skipped" in n and "junk.png" in n for n in rep["notes"])
    assert all(v["accuracy"] is not None for v in rep["variants"])
