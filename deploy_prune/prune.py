"""The pruning stage: the structured model and its unstructured twin.

* :func:`prune_structured` removes channels in ``spec.steps`` steps (analyse → criterion → plan → surgery, then
  finetune), composing each step's plan into one :class:`~deploy_prune.spec.PrunePlan` in the original
  numbering.
* A criterion's ``pairing`` says how the two pruned variants are made (:data:`PAIRINGS`):
  ``structured_first`` prunes channels, then masks the dense model to the same non-zero count;
  ``ticket_first`` (lottery) finds the unstructured ticket, then matches an L1 channel prune to its size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from deploy_prune import criteria, distributed
from deploy_prune.errors import BadInput, opt
from deploy_prune.metrics import count_nonzero, count_params
from deploy_prune.spec import PrunePlan, PruneSpec
from deploy_prune.surgery import PlanConfig, analyze, choose, plan_from_roots, prune_channels, select
from deploy_prune.target import ALLOCATIONS, Found, Measure, search, step_counts
from deploy_prune.train import Trainer
from deploy_prune.unstructured import make_permanent, mask_to_nonzero, weight_layers


@dataclass
class Pruned:
    """A channel-pruned model and how it came about.

    Attributes:
        model: the pruned module (finetuned when the run finetunes).
        plan: the kept channels per layer, in the original numbering.
        skipped: producer layers the analysis left (partly) alone, with the reason.
        accuracy_before_finetune: accuracy right after the first step's surgery (None without data).
        steps: one row per step (the report's ``schedule`` when there are several).
        criterion: what the criterion left for the report (artifacts, top-level entries, plots).
        target: with a latency target, what the search decided and measured.
    """

    model: nn.Module
    plan: PrunePlan
    skipped: dict[str, str]
    accuracy_before_finetune: float | None
    steps: list[dict[str, Any]]
    criterion: criteria.ScoreContext
    target: Found | None = None


@dataclass
class PrunedPair:
    """What the pruning stage hands on: both pruned variants and what the report says about them."""

    structured: Pruned
    unstructured: nn.Module
    unstructured_accuracy_before: float | None
    ratio: float
    report: dict[str, Any] = field(default_factory=dict)


def _plan_config(spec: PruneSpec, ratio: float, crit: Any = None) -> PlanConfig:
    assert isinstance(spec.round_to, int), "round_to auto is resolved in prune_pair"
    # a criterion may limit each step further (slimming: Liu et al.'s "at most 50% of any layer" per pass);
    # with a latency target the search owns the widths, so only --max-layer-ratio applies
    cap = getattr(crit, "step_layer_cap", None) if spec.target is None else None
    limit = min(spec.max_layer_ratio, cap) if cap is not None else spec.max_layer_ratio
    return PlanConfig(ratio=ratio, round_to=spec.round_to, max_layer_ratio=limit,
                      layer_ratios=dict(spec.layer_ratios), scope=spec.scope)


def _refuse_capped_ratio(spec: PruneSpec, crit: Any, per_step: float, limit: float) -> None:
    """A ratio that needs more of every layer than the per-step limit allows cannot be met; say so instead of
    pruning less than asked (a global threshold passes over capped layers, but not when every layer is capped)."""
    assert spec.ratio is not None
    steps = next((n for n in range(spec.steps + 1, 101) if 1 - (1 - spec.ratio) ** (1 / n) <= limit + 1e-9), None)
    own = getattr(crit, "step_layer_cap_option", None)
    which = opt(own) if own and limit < spec.max_layer_ratio else opt("max_layer_ratio")
    more = f"use {opt('steps')} {steps}, or raise {which}" if steps else f"raise {which}"
    raise BadInput(f"{opt('ratio')} {spec.ratio:g} in {spec.steps} step(s) removes {per_step:.0%} of the "
                   f"channels per step, more than {which} {limit:g} lets one step take from any layer; {more}")


def prune_structured(model: nn.Module, spec: PruneSpec, shape: tuple[int, ...], trainer: Trainer, *,
                     finetune: bool = True, measure: Measure | None = None,
                     say: Callable[[str], None] = lambda _: None) -> Pruned:
    """Prune ``model`` in place in ``spec.steps`` steps and, with ``finetune``, evaluate and finetune after each.

    With a ratio, each step removes ``1 - (1 - ratio)^(1/steps)`` of what is left. With a latency target, the
    first step's analysis is searched for the widths that meet it (:func:`deploy_prune.target.search`, measured
    with ``measure``) and the steps approach those widths geometrically.
    """
    if spec.target is not None and measure is None:
        raise ValueError("a latency target needs a Measure (provider, threads) to measure probes with")
    step_keep = (1 - spec.ratio) ** (1 / spec.steps) if spec.ratio is not None else 1.0
    found: Found | None = None
    plan: PrunePlan | None = None
    first: criteria.ScoreContext | None = None
    skipped: dict[str, str] = {}
    acc_before: float | None = None
    rows: list[dict[str, Any]] = []
    for step in range(spec.steps):
        graph = analyze(model, shape, ignore=spec.ignore)
        crit = criteria.create(spec.criterion, spec.options)
        ctx = criteria.ScoreContext(data=trainer.data, seed=spec.seed + step, progress=trainer.progress)
        cfg = _plan_config(spec, 1 - step_keep, crit)
        if spec.ratio is not None and not spec.layer_ratios and cfg.ratio > cfg.max_layer_ratio + 1e-9:
            _refuse_capped_ratio(spec, crit, cfg.ratio, cfg.max_layer_ratio)  # the same every step: raises at 0
        crit.prepare(model, graph, ctx)
        if spec.target is not None:
            assert measure is not None
            if found is None:  # measured: on rank 0 only under torchrun, the result broadcast to every rank
                allocations, judge = _allocations(spec, model, graph, trainer, finetune)
                found = distributed.on_main(lambda: search(model, graph, crit, cfg, spec.target, shape, measure,
                                                           getattr(say, "note", say), allocations=allocations,
                                                           judge=judge))
            step_plan = plan_from_roots(graph, choose(graph, crit, step_counts(graph, found, step, spec.steps, cfg)))
        else:
            step_plan = select(graph, crit, cfg)
        distributed.check_same_plan(step_plan, f"the pruning plan of step {step + 1}")  # no-op without torchrun
        widths_before = sum(graph.layer_widths().values())
        prune_channels(model, graph, step_plan)
        plan = step_plan if plan is None else plan.then(step_plan)
        if finetune:  # BatchNorm statistics of the narrowed network, before it is evaluated (EagleEye)
            trainer.recalibrate(model, f"structured step {step + 1}")
        acc = trainer.accuracy(model) if finetune else None
        if step == 0:
            first, skipped, acc_before = ctx, dict(graph.skipped), acc
        if finetune:
            trainer.finetune(model, f"finetune structured (step {step + 1}/{spec.steps})")
        rows.append({"step": step + 1, "params": count_params(model), "accuracy_pruned": acc,
                     "accuracy_finetuned": trainer.accuracy(model) if finetune and trainer.data else None,
                     "layers_changed": len(step_plan.kept), "widths_before": widths_before})
    assert plan is not None and first is not None
    return Pruned(model, plan, skipped, acc_before, rows, first, found)


def _allocations(spec: PruneSpec, model: nn.Module, graph: Any, trainer: Trainer, finetune: bool
                 ) -> tuple[tuple[str, ...], Callable[[PrunePlan], float] | None]:
    """The allocations the target search tries, and how it judges them (``--allocation``)."""
    if spec.allocation != "auto":
        return (spec.allocation,), None
    if not finetune or trainer.data is None or trainer.spec.bn_recalib_batches <= 0:
        return tuple(ALLOCATIONS), None  # latency first; the others only if it misses the band (target.search)

    def judge(plan: PrunePlan) -> float:
        candidate = copy.deepcopy(model)
        prune_channels(candidate, graph, plan)
        score = trainer.score(candidate)
        assert score is not None
        return score

    return tuple(ALLOCATIONS), judge


# ----------------------------------------------------------------------------------------------------------
# pairings


def _goal(spec: PruneSpec) -> str:
    if spec.target is None:
        return f"ratio {spec.ratio}"
    return (f"a measured speedup of {spec.target.value:g}x" if spec.target.kind == "speedup" else
            f"a measured latency of {spec.target.value:g} ms")


def structured_first(dense: nn.Module, spec: PruneSpec, shape: tuple[int, ...], trainer: Trainer,
                     say: Callable[[str], None], measure: Measure | None) -> PrunedPair:
    """Prune channels; then mask the dense model to the same non-zero count and give it the same finetuning."""
    say(f"pruning with {spec.criterion} to {_goal(spec)} ({spec.steps} step(s))")
    structured = prune_structured(copy.deepcopy(dense), spec, shape, trainer, measure=measure, say=say)
    target = count_nonzero(structured.model)
    say(f"unstructured: magnitude masks to {target:,} non-zero weights")
    unstructured = copy.deepcopy(dense)
    mask_to_nonzero(unstructured, target)  # live masks: finetuning cannot revive a pruned weight
    trainer.recalibrate(unstructured, "unstructured masks")
    before = trainer.accuracy(unstructured)
    trainer.finetune(unstructured, "finetune unstructured")
    make_permanent(unstructured)
    ratio = spec.ratio if spec.ratio is not None and not spec.layer_ratios else structured.plan.removed_fraction()
    return PrunedPair(structured, unstructured, before, ratio)


def _l1_twin(spec: PruneSpec, ratio: float | None) -> PruneSpec:
    """The structured L1 prune that lottery compares its ticket with (same ``l1_mode``, one step; the run's
    target when ``ratio`` is None)."""
    from deploy_prune.criteria.l1 import L1Options

    return spec.with_(criterion="l1", options=L1Options(l1_mode=spec.options.l1_mode), ratio=ratio, steps=1)


def _match_structured(dense: nn.Module, spec: PruneSpec, shape: tuple[int, ...], target_nonzero: int,
                      trainer: Trainer) -> tuple[Pruned, float]:
    """L1 prune at the ratio whose non-zero count is closest to ``target_nonzero`` from below."""
    lo, hi = 0.0, min(0.95, spec.max_layer_ratio)
    best: tuple[float, int] | None = None
    no_data = Trainer(None, trainer.spec, trainer.seed, trainer.progress)
    for _ in range(12):
        mid = (lo + hi) / 2
        nz = count_nonzero(prune_structured(copy.deepcopy(dense), _l1_twin(spec, mid), shape, no_data,
                                            finetune=False).model)
        # closest from below, so the ticket can be trimmed to exactly the same budget
        if nz <= target_nonzero and (best is None or nz > best[1]):
            best = (mid, nz)
        if nz > target_nonzero:
            lo = mid
        else:
            hi = mid
    if best is None:
        raise BadInput(f"no structured prune of this model is as small as the ticket; lower {opt('ratio')} or "
                       f"raise {opt('max_layer_ratio')}")
    return prune_structured(copy.deepcopy(dense), _l1_twin(spec, best[0]), shape, trainer), best[0]


def ticket_first(dense: nn.Module, spec: PruneSpec, shape: tuple[int, ...], trainer: Trainer,
                 say: Callable[[str], None], measure: Measure | None) -> PrunedPair:
    """Lottery: find the ticket, match a structured L1 prune to its size, trim the ticket to exactly that size
    and give it the same finetuning as its structured twin.

    With a latency target the order turns around: the structured L1 twin is searched for the target first, and
    the ticket is then found at the weight sparsity of that twin.
    """
    from deploy_prune.train.lottery import find_ticket

    o = spec.options
    twin: Pruned | None = None
    sparsity = spec.ratio
    if spec.target is not None:
        say(f"structured: L1 to {_goal(spec)}")
        twin = prune_structured(copy.deepcopy(dense), _l1_twin(spec, None), shape, trainer, measure=measure, say=say)
        sparsity = _weight_sparsity(dense, twin.model)
    assert sparsity is not None
    say(f"lottery: iterative magnitude pruning to {sparsity:.0%} sparsity in {o.lottery_rounds} rounds")
    res = find_ticket(copy.deepcopy(dense), trainer.data, target_sparsity=sparsity, rounds=o.lottery_rounds,
                      scope=o.lottery_scope, rewind_iter=o.rewind_iter, epochs_per_round=max(1, trainer.spec.epochs),
                      lr=trainer.spec.lr or 1.2e-3, optimizer="adam", seed=spec.seed, progress=trainer.progress,
                      reinit_control=o.reinit_control)
    ticket = res.model
    distributed.check_same("the lottery ticket's masks", _masks_digest(res.masks))
    info: dict[str, Any] = {"history": res.history, "reinit_accuracy": res.reinit_accuracy}
    if twin is None:
        say("structured: L1 matched to the ticket's non-zero count")
        structured, matched = _match_structured(dense, spec, shape, count_nonzero(ticket), trainer)
    else:
        structured, matched = twin, twin.plan.removed_fraction()
    # Channel counts move in steps, so the closest structured model sits a little below the ticket's budget;
    # the ticket's smallest surviving weights are trimmed to the same count (contract: within 1%). The
    # trimmed ticket then gets the same finetuning budget as its structured twin, masks live.
    ticket_nonzero = count_nonzero(ticket)
    info["ticket_accuracy"] = trainer.accuracy(ticket)
    mask_to_nonzero(ticket, count_nonzero(structured.model))
    # the trim is a surgery after training: re-estimate BN here. Not inside find_ticket's rounds: each round
    # rewinds to theta_0 (BatchNorm buffers included) and then trains, which re-estimates them anyway.
    trainer.recalibrate(ticket, "ticket trimmed to the structured count")
    before = trainer.accuracy(ticket)
    trainer.finetune(ticket, "finetune trimmed ticket")
    make_permanent(ticket)
    info["ticket_nonzero"] = ticket_nonzero
    info["trimmed_to_match"] = ticket_nonzero - count_nonzero(ticket)
    info["matched_structured_ratio"] = round(matched, 4)
    return PrunedPair(structured, ticket, before, sparsity, {"lottery": info})


def _masks_digest(masks: dict[str, Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].reshape(-1).to(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _weight_sparsity(dense: nn.Module, pruned: nn.Module) -> float:
    """The fraction of conv/linear weights ``pruned`` has lost against ``dense`` (lottery's sparsity unit)."""
    total = sum(m.weight.numel() for m in weight_layers(dense).values())
    kept = sum(m.weight.numel() for m in weight_layers(pruned).values())
    return min(0.99, max(0.01, 1 - kept / total))


PAIRINGS: dict[str, Callable[..., PrunedPair]] = {"structured_first": structured_first, "ticket_first": ticket_first}


def prune_pair(dense: nn.Module, spec: PruneSpec, shape: tuple[int, ...], trainer: Trainer,
               say: Callable[[str], None] = lambda _: None, measure: Measure | None = None) -> PrunedPair:
    """Both pruned variants of ``dense`` (which is not modified), made the way the criterion's pairing says.

    ``measure`` (the run's provider and benchmark settings) is needed for a latency target and for
    ``round_to="auto"``.
    """
    extra: dict[str, Any] = {}
    if spec.round_to == "auto":
        if measure is None:
            raise ValueError("round_to auto needs a Measure (provider, threads) to measure with")
        spec, extra["round_to_auto"] = resolve_round_to(dense, spec, shape, measure, say)
    pair = PAIRINGS[criteria.get(spec.criterion).pairing](dense, spec, shape, trainer, say, measure)
    pair.report.update(extra)
    pair.report.update(trainer.report())
    if pair.structured.target is not None:
        pair.report["target"] = pair.structured.target.report()
    pair.report["round_to"] = spec.round_to
    return pair


def resolve_round_to(dense: nn.Module, spec: PruneSpec, shape: tuple[int, ...], measure: Measure,
                     say: Callable[[str], None]) -> tuple[PruneSpec, dict[str, Any]]:
    """``round_to="auto"``: the channel step the one-layer timings show pays on this provider.

    Under torchrun rank 0 measures and broadcasts the step and its record (plain data: a spec holds
    read-only mappings that do not pickle); every rank then makes the same spec.
    """
    from deploy_prune import latency

    def measure_step() -> tuple[int, dict[str, Any]]:
        say("choosing the channel step (round_to auto): timing one-layer models on this provider")
        graph = analyze(dense, shape, ignore=spec.ignore)
        return latency.choose_step(latency.sites(graph, shape[0]), measure.timer(repeats=latency.AUTO_REPEATS))

    step, info = distributed.on_main(measure_step)
    return spec.with_(round_to=step), {"chosen": step, **info}
