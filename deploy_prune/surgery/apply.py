"""Removing channels: the one place that edits modules.

``prune_channels`` takes the analysis and a :class:`~deploy_prune.spec.PrunePlan`, and rewrites every member of
each removed channel class (producer outputs, consumer inputs, norm layers, depthwise convs, parameters read by
the forward). Replaying a plan on a freshly built architecture (:func:`replay`) gives the same pruned network,
which is how ``pruned.pt`` loads without pickle.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deploy_prune.errors import DeployPruneError, opt
from deploy_prune.spec import PrunePlan
from deploy_prune.surgery.graph import DependencyGraph, analyze
from deploy_prune.surgery.plan import roots_from_plan


def _keep(labels: torch.Tensor, graph: DependencyGraph, removed: set[int]) -> torch.Tensor:
    roots = graph.el.roots(labels)
    return torch.tensor([i for i, r in enumerate(roots.tolist()) if r not in removed], dtype=torch.long)


def _set_param(m: nn.Module, attr: str, value: torch.Tensor | None) -> None:
    old = getattr(m, attr, None)
    if old is None or value is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(m, attr, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(m, attr, value.detach().clone())


def _slice(m: nn.Module, attr: str, idx: torch.Tensor, dim: int = 0) -> None:
    t = getattr(m, attr, None)
    if isinstance(t, torch.Tensor):
        _set_param(m, attr, t.detach().index_select(dim, idx))


def prune_channels(model: nn.Module, graph: DependencyGraph, plan: PrunePlan) -> None:
    """Remove the channels ``plan`` drops from ``model``, in place.

    ``model`` must be the module ``graph`` was built from (or an identical copy of it).

    Raises:
        DeployPruneError: the plan does not fit this model (see :func:`~deploy_prune.surgery.plan.roots_from_plan`),
            or a layer would have to be sliced inconsistently.
    """
    removed = roots_from_plan(graph, plan)
    if not removed:
        return
    out_keep = {n: _keep(ids, graph, removed) for n, ids in graph.producer_ids.items()}
    reads: dict[tuple[str, str], torch.Tensor] = {}
    for c in graph.consumers:
        k = _keep(c.labels, graph, removed)
        prev = reads.get((c.name, c.role))
        if prev is not None and not torch.equal(prev, k):
            raise DeployPruneError(f"layer '{c.name}' is called on inputs pruned differently; leave it unpruned "
                                   f"with {opt('ignore')} {c.name}")
        reads[(c.name, c.role)] = k
    for (name, role), k in reads.items():
        m = model.get_submodule(name)
        if role == "in":
            if isinstance(m, nn.Linear):
                _slice(m, "weight", k, 1)
                m.in_features = len(k)
            else:
                _slice(m, "weight", k, 1)
                m.in_channels = len(k)
        elif role == "groups":  # whole groups go: the weight keeps its group width, the group count drops
            width = m.in_channels // m.groups
            m.in_channels = len(k)
            m.groups = len(k) // width
        elif role == "grouped":
            # every group keeps the same relative positions (graph.py couples them): slice by group 0's
            width = m.in_channels // m.groups
            _slice(m, "weight", k[k < width], 1)
            m.in_channels = len(k)
        elif role == "dw":
            _slice(m, "weight", k, 0)
            _slice(m, "bias", k, 0)
            m.in_channels = m.out_channels = m.groups = len(k)
        elif role == "norm":
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _slice(m, attr, k, 0)
            if isinstance(m, nn.GroupNorm):
                m.num_channels = len(k)
            elif isinstance(m, nn.LayerNorm):
                m.normalized_shape = (len(k),)
            else:
                m.num_features = len(k)
    for name in graph.order:
        k = out_keep[name]
        before = len(graph.producer_ids[name])
        if len(k) == before:
            continue
        m = model.get_submodule(name)
        _slice(m, "weight", k, 0)
        _slice(m, "bias", k, 0)
        if type(m) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
            # a subclass's own per-output-channel tensors (ScaledStdConv2d's gain [C_out, 1, 1, 1])
            for attr, t in [*m._parameters.items(), *m._buffers.items()]:
                if attr not in ("weight", "bias") and isinstance(t, torch.Tensor) and t.dim() >= 1 \
                        and t.shape[0] == before:
                    _slice(m, attr, k, 0)
        if isinstance(m, nn.Linear):
            m.out_features = len(k)
        else:
            m.out_channels = len(k)
    _rewrite_sizes(model, graph, removed)
    for p in graph.params.values():
        roots = graph.el.roots(p.ids)
        mask = torch.isin(roots, torch.tensor(sorted(removed), dtype=torch.long))
        if not bool(mask.any()):
            continue
        dims = [d for d in range(mask.dim()) if mask.shape[d] > 1 and bool((mask != mask.narrow(d, 0, 1)).any())]
        if len(dims) != 1:
            raise DeployPruneError(f"cannot slice tensor '{p.name}' consistently; leave its layer unpruned with "
                                   f"{opt('ignore')}")
        d = dims[0]
        idx = [0] * mask.dim()
        idx[d] = slice(None)
        keep = torch.nonzero(~mask[tuple(idx)].reshape(-1)).reshape(-1)
        owner, _, attr = p.name.rpartition(".")
        _slice(model.get_submodule(owner) if owner else model, attr, keep, d)


def _rewrite_sizes(model: nn.Module, graph: DependencyGraph, removed: set[int]) -> None:
    """Set every module attribute that holds split sizes or slice bounds (surgery/sizes.py) to the surviving
    counts, so the pruned forward cuts its narrower tensors at the right places."""
    new: dict[tuple[str, str], object] = {}
    for site in graph.size_sites:
        owner = model.get_submodule(site.owner)
        value = site.new_value(lambda t: len(_keep(t, graph, removed)), getattr(owner, site.attr))
        if (site.owner, site.attr) in new and new[(site.owner, site.attr)] != value:
            raise DeployPruneError(f"attribute '{site.attr}' of module '{site.owner}' would need two values after "
                                   f"pruning; leave that module unpruned with {opt('ignore')} {site.owner}.")
        if any(v == 0 for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise DeployPruneError(f"the plan removes every channel of a part split off at node {site.node}; "
                                   "keep at least one")
        new[(site.owner, site.attr)] = value
    for (owner, attr), value in new.items():
        setattr(model.get_submodule(owner), attr, value)


def replay(model: nn.Module, input_shape: tuple[int, ...], plan: PrunePlan) -> nn.Module:
    """Re-apply a recorded plan to a freshly built (unpruned) ``model``, in place; returns it."""
    prune_channels(model, analyze(model, input_shape), plan)
    return model
