"""Write a small ``imagefolder:DIR`` data set for benchmarks: the embedded digits (mnist5k), resized to RGB JPEGs.

``DIR/train/<digit>/*.jpg`` and ``DIR/val/<digit>/*.jpg``, ``--train`` and ``--val`` images per class, taken from
mnist5k's own train and val splits (deterministic), upscaled with bilinear interpolation to ``--size`` pixels and
written as 3-channel JPEGs, so ``deploy-prune run ... --data imagefolder:DIR`` sees ImageNet-sized photos of
real digits. Nothing is downloaded; the output is for benchmarks only (never commit it).

    python benchmarks/make_image_folder.py /tmp/digits224 --train 20 --val 10 --size 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=20, help="train images per class")
    ap.add_argument("--val", type=int, default=10, help="val images per class")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    from deploy_prune.data import MNIST_MEAN, MNIST_STD, load_data

    data = load_data("mnist5k", batch_size=256)
    for split, loader, per_class in (("train", data.train, args.train), ("val", data.val, args.val)):
        counts = dict.fromkeys(range(10), 0)
        for x, y in loader:
            for img, label in zip(x, y):
                c = int(label)
                if counts[c] >= per_class:
                    continue
                pixels = ((img[0].numpy() * MNIST_STD + MNIST_MEAN) * 255).clip(0, 255).astype(np.uint8)
                d = args.out / split / str(c)
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).resize((args.size, args.size), Image.BILINEAR).convert("RGB").save(
                    d / f"{counts[c]:04d}.jpg", quality=95)
                counts[c] += 1
            if all(v >= per_class for v in counts.values()):
                break
    print(f"{args.out}: {10 * args.train} train and {10 * args.val} val images, {args.size}x{args.size} RGB")


if __name__ == "__main__":
    main()
