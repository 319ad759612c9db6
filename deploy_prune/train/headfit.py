"""Classifier refit after surgery: least-squares reconstruction of the dense model's head outputs.

BatchNorm re-estimation (:mod:`.bn`) repairs every layer that a BatchNorm follows: the next BatchNorm
re-centres and re-scales whatever the narrowed layer now produces. The classifier has no BatchNorm after it.
When the last feature layer loses channels, the classifier's remaining columns still expect the evidence of
the removed ones, and the logits drift by a class-dependent amount that no statistic absorbs. On
``mnist_cnn`` at ratio 0.5 (128 -> 64 features) this is most of the damage: BatchNorm re-estimation alone
gives 38.7% before finetuning; refitting the classifier as below on the same 50 batches gives 87.7%.

The refit is the layer-wise reconstruction of He, Zhang & Sun (ICCV 2017, "Channel Pruning for Accelerating
Very Deep Neural Networks", §3.1: after choosing channels, the next layer's weights are the least-squares
solution that reconstructs the original layer's output) and ThiNet (Luo et al., ICCV 2017), applied to the one
layer they leave no later BatchNorm to correct: every ``nn.Linear`` whose inputs were narrowed and whose
outputs were not, and the ``nn.Linear`` that produces the model's output when its inputs were left whole but
layers before it were pruned. A BatchNorm before the classifier re-centres and re-scales each feature, but the
features now mean something else: on the digits at a 2x measured speed with apoz, a plan that kept all 128
features scored 30% after re-estimation alone and 93.5% with the classifier refit as well (one that narrowed
them to 16: 81%). Without this, the target search's judge (EagleEye-style, before finetuning) compared a
repaired classifier with an unrepaired one and took the plan that finetuned 0.3-0.8 points worse. For such a
layer with pruned input features ``X`` (one row per sample, a column of ones for the bias) and the dense
layer's outputs ``Y`` on the same images,

    W = argmin ||X W - Y||^2 + lam ||W||^2,   lam = 1e-3 * trace(X^T X) / d,

accumulated over the batches as ``X^T X`` and ``X^T Y`` (memory d^2, independent of the number of images)
and solved in float64. The small ridge term keeps the solve stable when features are collinear or fewer
images than features were seen. The new weights are kept only if they reconstruct the dense outputs better
than the current ones on those batches (the report records both errors). It needs no labels: the target is
the dense model's own output.

Departures: He et al. reconstruct every pruned layer (and choose channels by LASSO on the same objective);
here only the heads are refit, because every other layer is followed by a BatchNorm that re-estimation
already repairs, and the choice of channels stays the criterion's. Layers with more than ``MAX_FEATURES``
inputs (VGG's 25,088-wide first classifier layer) are skipped: ``X^T X`` would not fit in memory.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Iterable

import torch
import torch.nn as nn

MAX_FEATURES = 8192
RIDGE = 1e-3


def refit_candidates(model: nn.Module, dense: nn.Module, outputs: Iterable[str] = ()
                     ) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """``(name, pruned, dense)`` for every Linear whose inputs were narrowed and whose outputs were not, and for
    each Linear named in ``outputs`` (the layers producing the model's output, :func:`output_layers`) whose
    shape is the dense one's: its inputs are whole, but the layers before it were pruned.

    Layers with a live pruning mask (``torch.nn.utils.prune``'s ``weight_orig``/``weight_mask``, or a
    parametrization) are left alone: a refit would revive weights the mask holds at zero.
    """
    ref = dict(dense.named_modules())
    heads = set(outputs)
    out = []
    for name, m in model.named_modules():
        d = ref.get(name)
        if not (isinstance(m, nn.Linear) and isinstance(d, nn.Linear)):
            continue
        if m.out_features != d.out_features or m.in_features > d.in_features:
            continue
        if m.in_features == d.in_features and name not in heads:
            continue
        if hasattr(m, "weight_mask") or hasattr(m, "weight_orig") or hasattr(m, "parametrizations"):
            continue
        out.append((name, m, d))
    return out


def output_layers(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the ``nn.Linear`` layers whose output is the model's output (or one of its outputs) on ``x``:
    the classifiers. ``model`` runs once on ``x`` as it is (call it in eval mode, without gradients)."""
    # weak references, not ids: an intermediate output freed during the forward may leave its id to a later
    # tensor, and holding every output alive would cost a transformer's activations
    produced: list[tuple[str, weakref.ref[torch.Tensor]]] = []

    def hook(name: str) -> Any:
        def record(_m: nn.Module, _a: Any, out: Any) -> None:  # returns None: the output is left as it is
            if isinstance(out, torch.Tensor):
                produced.append((name, weakref.ref(out)))
        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        y = model(x)
    finally:
        for h in hooks:
            h.remove()
    ys = list(y.values()) if isinstance(y, dict) else list(y) if isinstance(y, (tuple, list)) else [y]
    return {name for name, ref in produced if any(ref() is t for t in ys)}


class _Accumulator:
    """Running ``X^T X``, ``X^T Y`` and ``Y^T Y`` in float64 for one layer."""

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        d = d_in + int(bias)
        self.bias = bias
        self.xtx = torch.zeros(d, d, dtype=torch.float64)
        self.xty = torch.zeros(d, d_out, dtype=torch.float64)
        self.yty = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        y = y.detach().reshape(-1, y.shape[-1]).double().cpu()
        if self.bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += float((y * y).sum())
        self.rows += len(x)

    def error(self, w: torch.Tensor) -> float:
        """Mean squared reconstruction error of ``X w`` against ``Y`` per output value."""
        sse = float((w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum()) + self.yty
        return max(sse, 0.0) / max(self.rows * self.xty.shape[1], 1)

    def solve(self) -> torch.Tensor:
        d = self.xtx.shape[0]
        lam = RIDGE * float(torch.trace(self.xtx)) / d + 1e-12
        return torch.linalg.solve(self.xtx + lam * torch.eye(d, dtype=torch.float64), self.xty)


def _stacked(layer: nn.Linear) -> torch.Tensor:
    w = layer.weight.detach().double().T.cpu()
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().double().cpu()[None]], 0)
    return w


def refit_heads(model: nn.Module, dense: nn.Module, batches: Iterable[Any], num_batches: int) -> list[dict[str, Any]]:
    """Refit every head of ``model`` that :func:`refit_candidates` finds; returns one row per layer considered.

    Args:
        model: the pruned model, changed in place (the heads' weights and biases only).
        dense: the model before pruning, the source of the target outputs; not changed.
        batches: ``(inputs, ...)`` batches; both models see the same images.
        num_batches: how many batches to accumulate over.
    """
    if num_batches <= 0:
        return []
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return []
    modes = {m: m.training for m in list(model.modules()) + list(dense.modules())}
    device = next(model.parameters()).device
    dense_device = next(dense.parameters()).device
    rows: list[dict[str, Any]] = []
    todo = []
    hooks = []
    try:
        model.eval()
        dense.eval()
        with torch.no_grad():
            for name, m, d in refit_candidates(model, dense, output_layers(model, first[0].to(device))):
                if m.in_features > MAX_FEATURES:
                    rows.append({"layer": name, "skipped": f"{m.in_features} input features (> {MAX_FEATURES})"})
                else:
                    todo.append((name, m, d, _Accumulator(m.in_features, m.out_features, m.bias is not None)))
            captured: dict[str, torch.Tensor] = {}
            for name, m, d, acc in todo:
                hooks.append(m.register_forward_pre_hook(lambda _m, args, n=name: captured.__setitem__(n, args[0])))
                hooks.append(d.register_forward_hook(lambda _m, _a, out, n=name, a=acc: a.add(captured.pop(n), out)))
            for seen, (x, *_) in enumerate(itertools.chain([first], it) if todo else ()):
                if seen >= num_batches:
                    break
                model(x.to(device))  # the pruned head's input is captured first ...
                dense(x.to(dense_device))  # ... and paired with the dense head's output on the same images
                captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for m, was in modes.items():
            m.training = was
    for name, m, _d, acc in todo:
        if acc.rows == 0:
            rows.append({"layer": name, "skipped": "no batches"})
            continue
        before = _stacked(m)
        w = acc.solve()
        err_before, err_after = acc.error(before), acc.error(w)
        row = {"layer": name, "in_features": m.in_features, "samples": acc.rows,
               "mse_before": round(err_before, 6), "mse_after": round(err_after, 6)}
        if torch.isfinite(w).all() and err_after < err_before:
            with torch.no_grad():
                m.weight.copy_(w[: m.in_features].T.to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.copy_(w[m.in_features].to(m.bias.dtype))
            row["applied"] = True
        else:
            row["applied"] = False
        rows.append(row)
    return rows
