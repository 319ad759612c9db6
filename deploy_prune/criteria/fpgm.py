"""``fpgm``: filter pruning via geometric median (He et al., CVPR 2019).

**Equation.** Flatten the raw weight of a conv/linear layer to N filters ``F_i`` of length ``C*k*k`` (signs
kept: the distances are between filters, not between magnitudes). Each filter's score is its summed
Euclidean distance to all filters of the same layer,
``s_i = g(F_i) = sum_j ||F_i - F_j||_2``,
and the filters with the *smallest* sums are pruned first: they are the ones nearest the layer's "centre", so
the remaining filters can stand in for them. This is exactly the official ``pruning_cifar10.py`` ``Mask``
(``scipy cdist`` Euclidean, summed, smallest ``int(N*rate_dist)`` zeroed). Scope: local (``ratio`` of each
group). Coupled producers (a residual stage) are reduced by summing each channel's ``s_i`` over its producer
layers; a layer's distances are taken over all its filters, including any the analysis cannot prune.

**Relation to the geometric median.** The geometric median is ``x* = argmin_x sum_j ||x - F_j||_2`` over all
of R^(C*k*k) (Eq. 2-3); Weiszfeld's iteration would find it. Eq. 4 of the paper and its code instead restrict
``x`` to the filters themselves, so the lowest-scoring filter is the *medoid* under summed distance and the
ranking is by ``g(F_i)``, not by the distance ``||F_i - x*||`` to the true median. This module follows the
paper and code.

**Options.** None.

**Departures from the paper's code.** (1) Hard pruning: channels are removed once, after which the pipeline
finetunes (PFEC-style); the paper's main results are *soft* pruning (zero, keep training, re-select every
epoch). (2) No "FPGM-mix" norm pre-selection (``rate_norm=1``, i.e. the paper's FPGM-only setting).
(3) The official ``--dist_type`` flag is dead code (``if dist_type == "l2" or "cos"`` is always true); only
Euclidean is implemented here, which is what that code actually ran.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from deploy_prune.criteria._util import producer_weight
from deploy_prune.criteria.base import BaseCriterion, register
from deploy_prune.surgery.graph import DependencyGraph, Group


def distance_sums(weight: torch.Tensor) -> torch.Tensor:
    """``s_i = sum_j ||F_i - F_j||_2`` over the flattened raw filters of ``weight``.

    Float64 with the matrix-product form of cdist: fast on wide layers, and float64 keeps the
    ``|a|^2 + |b|^2 - 2ab`` cancellation error far below any gap between real filters.
    """
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    return torch.cdist(flat, flat, p=2.0, compute_mode="use_mm_for_euclid_dist").sum(dim=1)


@register
class FPGMCriterion(BaseCriterion):
    """Summed Euclidean distance to the layer's other filters; see the module docstring."""

    name: ClassVar[str] = "fpgm"
    summary: ClassVar[str] = "filter pruning via geometric median (He et al. 2019)"

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        sums = {m: distance_sums(producer_weight(graph, m)) for m in group.modules}
        return torch.tensor([sum(float(sums[m][i]) for m, i in ch.producers) for ch in group.channels])
