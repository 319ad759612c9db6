"""Regenerate the shipped ``mnist_cnn.pt``: ``python -m deploy_prune.models.train [--epochs 8] [--out PATH]``.

Trains ``builtin:mnist_cnn`` on the embedded mnist5k split (4,000 train / 1,000 val digits), Adam 1e-3,
batch 64, seed 0, and saves a plain state_dict (loadable with ``weights_only=True``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deploy_prune.data import load_data
from deploy_prune.models import get
from deploy_prune.train import evaluate, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("mnist_cnn.pt"))
    args = ap.parse_args()
    torch.manual_seed(0)
    entry = get("mnist_cnn")
    model = entry.build()
    data = load_data("mnist5k", batch_size=64, seed=0)
    train(model, data.train, epochs=args.epochs, lr=1e-3, optimizer="adam", desc="train mnist_cnn", seed=0)
    acc = evaluate(model, data.val)
    torch.save(model.state_dict(), args.out)
    print(f"val accuracy {acc:.2f}% -> {args.out}")


if __name__ == "__main__":
    main()
