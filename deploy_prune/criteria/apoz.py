"""``apoz``: Average Percentage of Zeros (Hu et al., "Network Trimming", 2016).

**Equation.** For channel c with post-ReLU output ``O_c``, over N calibration images and M output positions
(M = H*W for a conv, 1 for a linear layer):
``APoZ_c = sum_k sum_j 1[O_{c,j}(k) == 0] / (N * M)``.
Only **exact** zeros count: a tiny positive activation is an active neuron. Channels with a high APoZ are
pruned first (score ``-APoZ``). Scope: local (``ratio`` of each group).

**Where the activations come from.** The dependency analysis records, for every channel, the ReLU/ReLU6 fx
nodes it enters (``Channel.relus``: node, channel dim, index); those nodes' *outputs* are the post-ReLU
activations. ``prepare`` runs ``calib_batches`` batches of ``ctx.data.val`` (``ctx.data.train`` if val is
empty) through the traced graph in eval mode and counts, per node and channel, the exact zeros as each node
is computed. Counting on the fly (rather than collecting tensors with ``DependencyGraph.capture``) keeps memory
at one activation at a time and is immune to later in-place ops (``x += y``) on a captured output.
A channel that reaches several ReLUs (a residual stage: each block's final ReLU) pools the zeros and positions
of all of them.

**Unscored channels.** A channel that enters no ReLU (followed by GELU/SiLU/LeakyReLU, by nothing, or measured
only before its activation) has no meaningful APoZ: its score is ``+inf`` ("no evidence": never removed, per
the planner's contract for non-finite scores) and it is listed in ``ctx.artifacts["apoz_unscored"]`` as
``{"layer", "channels", "reason"}`` per producer layer.

**Artifacts.** ``ctx.artifacts["apoz"] = {"images", "batches", "layer_mean": {producer layer: mean APoZ of its
scored channels}, "relu_mean": {relu node: mean APoZ over its channels}}`` (the paper's Table 1).

**Options** (:class:`APoZOptions`): ``calib_batches`` (default 8), the number of calibration batches.

**Departures from the paper.** Hu et al. prune neurons whose APoZ exceeds the layer mean by one standard
deviation, starting from the layers with the highest mean APoZ, and iterate trim/retrain; here one pass
removes ``ratio`` of every group (the planner's rule) and the pipeline finetunes once. The paper measures on a
large validation set; a few batches are used here (raise ``calib_batches`` for stabler estimates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from deploy_prune import distributed
from deploy_prune.criteria.base import BaseCriterion, CriterionOptions, ScoreContext, option, register
from deploy_prune.errors import BadInput, opt
from deploy_prune.surgery.graph import DependencyGraph, Group

NO_RELU = ("the channel enters no ReLU, so it has no post-ReLU zeros to count (APoZ needs exact zeros from a "
           "ReLU); kept")


class ZeroCounter(fx.Interpreter):
    """Runs a traced graph and counts exact zeros per channel in the outputs of the given nodes."""

    def __init__(self, gm: fx.GraphModule, sites: dict[str, int]) -> None:
        super().__init__(gm)
        self.sites = sites  # fx node name -> channel dim of its output
        self.zeros: dict[str, torch.Tensor] = {}  # node -> zeros per channel (int64)
        self.positions: dict[str, int] = {}  # node -> values counted per channel (N * M)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        dim = self.sites.get(n.name)
        if dim is not None and isinstance(out, torch.Tensor):
            z = (out.detach() == 0).movedim(dim, 0).reshape(out.shape[dim], -1)
            self.zeros[n.name] = self.zeros.get(n.name, 0) + z.sum(dim=1, dtype=torch.int64)
            self.positions[n.name] = self.positions.get(n.name, 0) + z.shape[1]
        return out


def count_zeros(graph: DependencyGraph, batches: Any, max_batches: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, int], int, int]:
    """Exact-zero counts at every ReLU site of ``graph`` over up to ``max_batches`` batches.

    Returns ``(zeros per node, positions per node, images, batches)``.
    """
    sites: dict[str, int] = {}
    for g in graph.groups:
        for ch in g.channels:
            for node, dim, _ in ch.relus:
                sites[node] = dim
    model = graph.model
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counter = ZeroCounter(graph.gm, sites)
    images = used = 0
    model.eval()
    try:
        with torch.no_grad():
            # data-parallel: each rank counts its share of the first max_batches batches; the counts are summed
            for x, *_ in distributed.shard_eval(batches, max_batches):
                counter.run(x.to(device))
                images += int(x.shape[0])
                used += 1
    finally:
        model.train(was_training)
    if not distributed.active():
        return counter.zeros, counter.positions, images, used
    zeros = distributed.sum_tensors(counter.zeros)
    positions = distributed.sum_tensors({k: torch.tensor(v, dtype=torch.int64) for k, v in counter.positions.items()})
    images, used = distributed.sum_numbers(images, used)
    return zeros, {k: int(v) for k, v in positions.items()}, int(images), int(used)


@dataclass(frozen=True)
class APoZOptions(CriterionOptions):
    calib_batches: int = option(8, "apoz: calibration batches.", minimum=1, integer=True)


@register
class APoZCriterion(BaseCriterion):
    """Fraction of exact zeros after ReLU, highest pruned first; see the module docstring."""

    name: ClassVar[str] = "apoz"
    summary: ClassVar[str] = "average percentage of zeros after ReLU (Hu et al. 2016)"
    needs_data: ClassVar[bool] = True
    data_use: ClassVar[str] = "calibration data to count zero activations"
    Options = APoZOptions
    options: APoZOptions
    apoz: dict[int, float] | None = None  # channel root -> APoZ in [0, 1], set by prepare()

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None:
        if ctx.data is None:
            raise BadInput(f"apoz needs calibration data: pass {opt('data')} mnist5k or {opt('data')} "
                           "imagefolder:DIR")
        batches = self.options.calib_batches
        zeros, positions, images, used = count_zeros(graph, ctx.data.val, batches)
        if used == 0:  # an empty validation split: fall back to training images
            zeros, positions, images, used = count_zeros(graph, ctx.data.train, batches)
        if used == 0:
            raise BadInput(f"apoz found no calibration images in {opt('data')}: give it a non-empty train or val split")
        self.apoz = {}
        unscored: list[dict[str, Any]] = []
        layer_values: dict[str, list[float]] = {}
        for g in graph.groups:
            missing: dict[str, list[int]] = {}
            for ch in g.channels:
                if not ch.relus:
                    for m, i in ch.producers:
                        missing.setdefault(m, []).append(i)
                    continue
                z = sum(int(zeros[node][i]) for node, _, i in ch.relus)
                n = sum(positions[node] for node, _, _ in ch.relus)
                self.apoz[ch.root] = z / n
                for m, _ in ch.producers:
                    layer_values.setdefault(m, []).append(z / n)
            unscored += [{"layer": m, "channels": idx, "reason": NO_RELU} for m, idx in missing.items()]
        relu_mean = {node: float((zeros[node].double() / positions[node]).mean()) for node in zeros}
        ctx.artifacts["apoz"] = {"images": images, "batches": used,
                                 "layer_mean": {m: sum(v) / len(v) for m, v in layer_values.items()},
                                 "relu_mean": relu_mean}
        ctx.artifacts["apoz_unscored"] = unscored

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        if self.apoz is None:
            raise RuntimeError("apoz: prepare() must run (with calibration data) before score()")
        return torch.tensor([-self.apoz[ch.root] if ch.root in self.apoz else float("inf")
                             for ch in group.channels])
