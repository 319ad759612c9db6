"""Regenerate the shipped ``mnist_cnn.pt``: ``python -m deploy_prune.models.train [--epochs 20] [--out PATH]``.

Trains ``builtin:mnist_cnn`` to convergence on the embedded mnist5k split (4,000 train / 1,000 val digits):
AdamW 2e-3, weight decay 0.05 (none on BatchNorm parameters and biases), a cosine schedule with 5% warm-up,
batch 64, seed 0, 20 epochs (99.1% val, 100% train). It saves a plain state_dict (loadable with
``weights_only=True``). The weights shipped before 2026-12-04 were 8 epochs of Adam 1e-3 at a constant rate
(97.1% val): an under-trained model, which three more epochs of finetuning beat, so that distilling from it
cost its pruned students accuracy (docs/criteria.md, "A converged digits model").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deploy_prune.data import load_data
from deploy_prune.models import get
from deploy_prune.spec import TrainSpec
from deploy_prune.train import Trainer, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("mnist_cnn.pt"))
    args = ap.parse_args()
    torch.manual_seed(0)
    entry = get("mnist_cnn")
    model = entry.build()
    data = load_data("mnist5k", batch_size=64, seed=0)
    # the product's finetuning recipe (AdamW, no decay on BatchNorm/bias, warm-up + cosine), without a teacher
    spec = TrainSpec(epochs=args.epochs, lr=2e-3, weight_decay=0.05, warmup_epochs=args.epochs / 20)
    Trainer(data, spec, seed=0).finetune(model, "train mnist_cnn")
    acc = evaluate(model, data.val)
    torch.save(model.state_dict(), args.out)
    print(f"val accuracy {acc:.2f}% -> {args.out}")


if __name__ == "__main__":
    main()
