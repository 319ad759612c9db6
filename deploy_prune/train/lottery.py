"""The lottery-ticket schedule: iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR 2019).

This is a *schedule* for unstructured pruning, not a channel score. :func:`find_ticket` runs

1. save theta_0 (the given weights), or, with ``rewind_iter = k > 0``, theta_k = the weights after k optimizer
   steps of the first (dense) training run (late rewinding, Frankle et al. 2019/2020);
2. train (round 0 is the dense network);
3. prune ``p`` of the *surviving* conv/linear weights by ``|w|``, either ``scope="global"`` (one ranking over
   all layers, the paper's VGG-19/ResNet-18 setting and OpenLTH's ``sparse_global``) or ``scope="layer"``
   (the same fraction in every layer, the output layer at half that rate, the paper's LeNet/Conv-n setting);
4. reset every parameter and buffer to theta_0 / theta_k and zero the pruned weights;
5. repeat 2-4 for ``rounds`` rounds, then train the final ticket once more.

After ``n`` rounds at rate ``p``, ``(1 - p)^n`` of the weights remain. With ``rate_per_round=None``,
``p = 1 - (1 - target_sparsity)^(1/rounds)``, so the last round lands on the target; with an explicit rate,
each round prunes ``p`` of the survivors (never past the target) and the last round prunes whatever is still
needed to reach ``target_sparsity`` exactly (per layer in layer mode: one rate r for hidden layers and r/2
for the output layer, solved so the total matches, up to rounding of one weight per layer).

Masks are re-applied after every optimizer step (``after_step``), so pruned weights are exactly zero at
every forward pass; they are plain tensors (no ``torch.nn.utils.prune`` re-parametrisation), so the returned
model has ordinary ``weight`` parameters with zeros, no ``weight_orig``/``weight_mask`` and no hooks.
Biases and normalisation parameters are never pruned. "Sparsity" everywhere means the fraction of conv/linear
*weight* entries that are pruned.

**Departures.** The paper trains for a fixed number of iterations and reports the early-stopping iteration
(minimum validation loss); here each round trains ``epochs_per_round`` epochs at a constant LR and records
the final validation accuracy. The output layer (for the half rate) is the last conv/linear module in
registration order. The optional random-reinitialisation control keeps the final mask and draws new weights
with each module's own ``reset_parameters`` (PyTorch's default init, which can differ from the init scheme a
model's constructor applied), seeded with ``seed + 1``, then trains with the same budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput
from deploy_prune.unstructured import weight_layers

Masks = dict[str, torch.Tensor]
SCOPES = ("global", "layer")


@dataclass
class TicketResult:
    """What :func:`find_ticket` returns.

    Attributes:
        model: the trained final ticket; pruned weights are plain zeros (no re-parametrisation left).
        masks: ``{module name: bool tensor shaped like its weight}``, True = kept.
        history: one dict per round (0 = dense): ``round``, ``sparsity``, ``accuracy`` (val top-1 %),
            ``loss`` (mean training loss of the last epoch, None without training).
        reinit_accuracy: accuracy of the same mask with random re-initialisation (None unless requested).
        rewind_state: the state the survivors were reset to each round (theta_0 or theta_k).
        rate_per_round: the per-round pruning fraction that was used.
    """

    model: nn.Module
    masks: Masks
    history: list[dict[str, Any]]
    reinit_accuracy: float | None
    rewind_state: dict[str, torch.Tensor]
    rate_per_round: float


def mask_sparsity(masks: Masks) -> float:
    """Fraction of masked (pruned) entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def zero_masked(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights of ``model`` in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.masked_fill_(~mask, 0.0)


def _lowest_survivors(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` smallest-|w| surviving entries (stable: ties go to the lower index)."""
    mag = weight.detach().abs().reshape(-1).double().masked_fill(~mask.reshape(-1), math.inf)
    return torch.sort(mag, stable=True).indices[:k]


def _prune_global(layers: dict[str, nn.Module], masks: Masks, k: int) -> Masks:
    names = list(masks)
    flat_w = torch.cat([layers[n].weight.detach().reshape(-1) for n in names])
    flat_m = torch.cat([masks[n].reshape(-1) for n in names])
    gone = torch.zeros_like(flat_m)
    gone[_lowest_survivors(flat_w, flat_m, k)] = True
    new = flat_m & ~gone
    out: Masks = {}
    start = 0
    for n in names:
        size = masks[n].numel()
        out[n] = new[start:start + size].reshape(masks[n].shape)
        start += size
    return out


def _prune_layers(layers: dict[str, nn.Module], masks: Masks, counts: dict[str, int]) -> Masks:
    out: Masks = {}
    for n, mask in masks.items():
        flat = mask.reshape(-1).clone()
        flat[_lowest_survivors(layers[n].weight, mask, counts.get(n, 0))] = False
        out[n] = flat.reshape(mask.shape)
    return out


def prune_round(layers: dict[str, nn.Module], masks: Masks, *, rate: float, scope: str, output: str | None,
                target_kept: int, final: bool) -> Masks:
    """One magnitude-pruning round: remove ``rate`` of the survivors, never going below ``target_kept``
    surviving weights; the ``final`` round lands on ``target_kept`` exactly (up to per-layer rounding).

    In layer scope, ``output`` (the output layer) is pruned at half the rate of the others.
    """
    kept = {n: int(m.sum()) for n, m in masks.items()}
    total = sum(kept.values())
    excess = max(total - target_kept, 0)
    if scope == "global":
        k = excess if final else min(int(round(rate * total)), excess)
        return _prune_global(layers, masks, k)
    half = {n: (0.5 if n == output and len(masks) > 1 else 1.0) for n in masks}
    counts = {n: int(round(rate * half[n] * kept[n])) for n in masks}
    if final or sum(counts.values()) > excess:
        # one rate r (r/2 for the output layer) chosen so that sum_l r * half_l * kept_l = excess
        weighted = sum(half[n] * kept[n] for n in masks)
        r = min(excess / weighted, 1.0) if weighted else 0.0
        counts = {n: min(int(round(r * half[n] * kept[n])), max(kept[n] - 1, 0)) for n in masks}
    return _prune_layers(layers, masks, counts)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def find_ticket(model: nn.Module, data: Any, *, target_sparsity: float, rounds: int,
                rate_per_round: float | None = None, scope: str = "global", rewind_iter: int = 0,
                epochs_per_round: int = 1, lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9,
                weight_decay: float = 0.0, seed: int = 0, reinit_control: bool = False,
                on_round: Callable[[int, nn.Module], None] | None = None,
                progress: bool = True) -> TicketResult:
    """Find a winning ticket by iterative magnitude pruning with rewinding (see the module docstring).

    ``model`` is not modified: the search runs on a copy, and its current weights are theta_0.

    Args:
        model: the network at initialisation (or any starting point to rewind to).
        data: a :class:`~deploy_prune.data.DataBundle` (``train`` trains, ``val`` scores each round).
        target_sparsity: final fraction of conv/linear weights pruned, 0 < s < 1.
        rounds: number of prune-rewind rounds (the network is trained ``rounds + 1`` times).
        rate_per_round: fraction of survivors pruned per round; None derives it from the target and rounds.
        scope: ``"global"`` or ``"layer"`` (output layer at half rate).
        rewind_iter: 0 rewinds to theta_0; k > 0 to the weights after k steps of the dense run.
        epochs_per_round, lr, optimizer, momentum, weight_decay: training of every round
            (see :func:`deploy_prune.train.train`).
        seed: seeds every training run (same data order in every round) and the reinit control.
        reinit_control: also train the final mask from a random re-initialisation.
        on_round: called as ``on_round(round, model)`` right before each round's training (after the
            rewind), e.g. to log or inspect the ticket at its starting point.
        progress: show training progress bars.

    Raises:
        BadInput: a parameter out of range, a model without conv/linear layers, or ``rewind_iter`` larger
            than the number of steps in one training run.
    """
    from deploy_prune.train.loop import evaluate, train

    if not 0.0 < target_sparsity < 1.0:
        raise BadInput(f"lottery target sparsity must be in (0, 1), got {target_sparsity}")
    if rounds < 1:
        raise BadInput(f"lottery needs at least one pruning round, got {rounds}")
    if rate_per_round is not None and not 0.0 < rate_per_round < 1.0:
        raise BadInput(f"lottery rate per round must be in (0, 1), got {rate_per_round}")
    if scope not in SCOPES:
        raise BadInput(f"lottery scope {scope!r} is not valid: use global or layer")
    if rewind_iter < 0:
        raise BadInput(f"rewind_iter must be >= 0, got {rewind_iter}")
    net = copy.deepcopy(model)
    layers = weight_layers(net)
    if not layers:
        raise BadInput("lottery pruning found no conv or linear layer to prune in this model")
    rate = rate_per_round if rate_per_round is not None else 1.0 - (1.0 - target_sparsity) ** (1.0 / rounds)
    masks: Masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    target_kept = int(round((1.0 - target_sparsity) * sum(m.numel() for m in masks.values())))
    output = list(layers)[-1]
    rewind_state = _snapshot(net) if rewind_iter == 0 else None
    steps = 0

    class AfterStep:
        """Re-applies the masks after every step and takes the rewind snapshot; its state is saved with the
        run's epoch checkpoints (resume.py) so that a resumed search rewinds to the same weights."""

        def __call__(self, m: nn.Module) -> None:
            nonlocal steps, rewind_state
            zero_masked(m, masks)
            steps += 1
            if rewind_state is None and steps == rewind_iter:
                rewind_state = _snapshot(m)

        def state_dict(self) -> dict[str, Any]:
            return {"steps": steps, "rewind_state": rewind_state}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            nonlocal steps, rewind_state
            steps, rewind_state = int(state["steps"]), state["rewind_state"]

    after_step = AfterStep()

    def run(m: nn.Module, label: str) -> tuple[float, float | None]:
        losses = train(m, data.train, epochs=epochs_per_round, lr=lr, optimizer=optimizer, momentum=momentum,
                       weight_decay=weight_decay, after_step=after_step, seed=seed, desc=label,
                       progress=progress)
        return evaluate(m, data.val), (losses[-1] if losses else None)

    history: list[dict[str, Any]] = []
    for r in range(rounds + 1):
        if r > 0:
            assert rewind_state is not None
            masks = prune_round(layers, masks, rate=rate, scope=scope, output=output, target_kept=target_kept,
                                final=r == rounds)
            net.load_state_dict(rewind_state)
            zero_masked(net, masks)
        if on_round is not None:
            on_round(r, net)
        acc, loss = run(net, f"lottery round {r}/{rounds}")
        if rewind_state is None:
            raise BadInput(f"rewind_iter={rewind_iter} is beyond the {steps} optimizer steps of one training "
                           "run: lower it or train more epochs per round")
        history.append({"round": r, "sparsity": mask_sparsity(masks), "accuracy": acc, "loss": loss})

    reinit_accuracy = None
    if reinit_control:
        control = copy.deepcopy(model)
        torch.manual_seed(seed + 1)
        for m in control.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        zero_masked(control, masks)
        reinit_accuracy, _ = run(control, "lottery reinit control")
    return TicketResult(net, masks, history, reinit_accuracy, rewind_state, rate)
