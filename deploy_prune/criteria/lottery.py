"""``lottery``: the registry entry for Frankle & Carbin's lottery tickets (ICLR 2019).

The ticket itself is an unstructured network found by iterative magnitude pruning with rewinding
(:func:`deploy_prune.train.lottery.find_ticket`, the schedule). This entry scores channels for the *structured*
counterpart the pipeline compares it with: filter L1, exactly as ``l1`` (same ``l1_mode`` option), with the
ratio matched to the ticket's non-zero weight count (pairing ``"ticket_first"`` in :mod:`deploy_prune.prune`).
``needs_data`` is True because finding a ticket trains the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deploy_prune.criteria.base import option, register
from deploy_prune.criteria.l1 import L1Criterion, L1Options

SCOPES = ("global", "layer")


@dataclass(frozen=True)
class LotteryOptions(L1Options):
    lottery_rounds: int = option(3, "lottery: pruning rounds.", minimum=1, integer=True)
    lottery_scope: str = option("global", "lottery: global | layer (one ranking over all layers, or the same "
                                "fraction per layer with the output layer at half rate).", choices=SCOPES)
    rewind_iter: int = option(0, "lottery: rewind survivors to their value after k training iterations (0 = the "
                              "weights the run starts from: the initialisation of an untrained model, else the "
                              "checkpoint).", minimum=0, integer=True)
    reinit_control: bool = option(False, "lottery: also train the ticket's mask from a fresh random init (the "
                                  "paper's control).")


@register
class LotteryCriterion(L1Criterion):
    """Lottery tickets; structured twin scored by filter L1 (see the module docstring)."""

    name: ClassVar[str] = "lottery"
    summary: ClassVar[str] = "lottery ticket: iterative magnitude pruning with rewinding (Frankle & Carbin 2019)"
    needs_data: ClassVar[bool] = True
    data_use: ClassVar[str] = "data to train tickets"
    pairing: ClassVar[str] = "ticket_first"
    Options = LotteryOptions
    options: LotteryOptions
