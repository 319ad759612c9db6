"""Per-epoch time of ``imagefolder`` data with ``--workers 0`` vs ``--workers N``: decoding + augmentation alone,
and one finetuning epoch of a small CNN, measured side by side in one run.

A folder of JPEGs (photo-sized, 500x375, random content, quality 90) is generated into a temporary directory,
loaded with :func:`deploy_prune.data.load_data` exactly as ``deploy-prune run --data imagefolder:DIR
--image-size S --workers N`` loads it, and each setting is timed ``--repeats`` times in alternation (0, N, 0,
N, ...), reporting the median. Run it under the machine's benchmark lock::

    flock /tmp/deploy-prune-bench.lock python benchmarks/imagefolder_workers.py --workers 0,2

The numbers depend on the cores the machine has free: workers are processes that compete with the training
process for the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_folder(root: Path, n_train: int, n_val: int, classes: int, size: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    # smooth random images (noise JPEGs would be unrealistically large and slow to decode)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.BICUBIC).save(d / f"{i}.jpg", quality=90)


def epoch(loader, model=None, opt=None) -> tuple[float, int]:  # noqa: ANN001
    t0 = time.perf_counter()
    n = 0
    for x, y in loader:
        n += int(y.shape[0])
        if model is not None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="0,2", help="comma-separated worker counts to compare")
    ap.add_argument("--train", type=int, default=384, help="training images")
    ap.add_argument("--val", type=int, default=128, help="validation images")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="mobilenet_v3_small", help="torchvision model for the training epoch")
    args = ap.parse_args()

    import torchvision

    from deploy_prune.data import LoaderOptions, load_data

    settings = [int(w) for w in args.workers.split(",")]
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="imagefolder-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_folder(root, args.train, args.val, args.classes, (500, 375))
        print(f"wrote {args.train}+{args.val} JPEGs 500x375 in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        bundles = {w: load_data(f"imagefolder:{root}", batch_size=args.batch_size, seed=0,
                                options=LoaderOptions(workers=w, image_size=args.image_size)) for w in settings}
        print(f"listed and verified the files {len(settings)}x in {time.perf_counter() - t0:.1f}s")
        torch.manual_seed(0)
        model = torchvision.models.get_model(args.model, num_classes=args.classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        times: dict[tuple[str, int], list[float]] = {}
        for w in settings:  # warm-up: start the persistent workers, fill caches
            epoch(bundles[w].val)
        for _ in range(args.repeats):
            for w in settings:
                b = bundles[w]
                for what, loader, m in (("decode+augment train", b.train, None), ("eval transform val", b.val, None),
                                        (f"train epoch {args.model}", b.train, model)):
                    model.train()
                    s, n = epoch(loader, m, opt)
                    times.setdefault((what, w), []).append(s)
                    print(f"  {what}, workers {w}: {s:.2f}s for {n} images", flush=True)
        print(f"\nimage size {args.image_size}, batch {args.batch_size}, median of {args.repeats} (interleaved):")
        print(f"{'what':<34} {'workers':>7} {'s/epoch':>9} {'img/s':>8} {'vs workers=' + str(settings[0]):>14}")
        for what in dict.fromkeys(k[0] for k in times):
            base = statistics.median(times[(what, settings[0])])
            for w in settings:
                med = statistics.median(times[(what, w)])
                n = args.val if what.startswith("eval") else args.train
                print(f"{what:<34} {w:>7} {med:>9.2f} {n / med:>8.1f} {base / med:>13.2f}x")


if __name__ == "__main__":
    main()
