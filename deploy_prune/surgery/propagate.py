"""The label propagator: runs a traced graph on label tensors and records how channels are coupled.

See graph.py for the method; this module holds the interpreter and the records it leaves in the
:class:`~deploy_prune.surgery.graph.DependencyGraph` (consumers, parameters read by the forward, ReLU sites).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from deploy_prune.errors import UnsupportedModel
from deploy_prune.surgery.ops import (
    BINARY_FUNCS, BINARY_METHODS, CONV, MOVE_FUNCS, MOVE_METHODS, NORM, PASS_FUNCS, PASS_METHODS,
    PASS_MODULES, POW_FUNCS, REDUCE_FUNCS, REDUCE_METHODS, RELU_FUNCS, RELU_MODULES, RESHAPES, SLICING,
    SOFTMAX_FUNCS, SPATIAL_FUNCS, SPATIAL_MODULES, along, meta_shapes, tensors, tracks_labels, varying_dims,
    vector)
from deploy_prune.surgery.sizes import SizeSite, find_size_attr
from deploy_prune.surgery.unionfind import _distinct

if TYPE_CHECKING:
    from deploy_prune.surgery.graph import DependencyGraph


def _elementwise(m: nn.Module) -> bool:
    """Whether module ``m`` acts on each element alone: torch's activations and dropouts, timm's activation
    modules (``timm.layers.activations*``), or a PReLU with one shared slope."""
    if isinstance(m, nn.PReLU):
        return m.num_parameters == 1
    if isinstance(m, PASS_MODULES):
        return True
    mod = type(m).__module__
    return mod.startswith("timm.layers.activations") and not any(True for _ in m.parameters())


@dataclass
class Consumer:
    """A module reading labelled positions along ``dim`` of its input (conv/linear input, norm, depthwise)."""

    name: str
    role: str  # "in" (conv/linear input), "norm", "dw" (depthwise), "grouped" (grouped conv input, positions
    # coupled across groups), "groups" (grouped conv input pruned by whole groups)
    labels: torch.Tensor  # 1-D: element id at each position along dim


@dataclass
class Param:
    name: str  # qualified parameter/buffer name
    ids: torch.Tensor  # element id per entry (same shape as the tensor)


@dataclass
class ReluSite:
    node: str
    dim: int
    labels: torch.Tensor  # 1-D labels along dim


class Propagator(fx.Interpreter):
    """Interprets the traced graph on label tensors (see the module docstring)."""

    def __init__(self, g: DependencyGraph) -> None:
        super().__init__(g.gm, garbage_collect_values=True)
        self.g = g
        self.el = g.el
        self.node: fx.Node | None = None
        # Where sizes come from: a size tuple node -> {dim: labels of the tensor whose channel dim it measured},
        # and an int node -> the label sets of the channel widths it was computed from (e.g. C // heads).
        self.size_of: dict[str, dict[int, frozenset[int]]] = {}
        self.width_of: dict[str, list[frozenset[int]]] = {}
        self.size_cache: dict[Any, Any] = {}  # (module, literal) -> the attribute holding it (sizes.py)

    # -- helpers --
    def _where(self) -> str:
        n = self.node
        if n is None:
            return "?"
        if n.op == "call_module":
            return f"module '{n.target}' ({type(self.g.model.get_submodule(str(n.target))).__name__})"
        tgt = getattr(n.target, "__name__", str(n.target))
        return f"op '{tgt}' (node {n.name})"

    def _opaque(self, reason: str) -> Any:
        """Block everything read by the current node and return blocked labels shaped like its output."""
        assert self.node is not None
        shapes = meta_shapes(self.node)
        el = self.el

        def mk(s: Any) -> Any:
            if isinstance(s, torch.Size):
                e = el.new(1, reason)
                return e.expand(s).contiguous() if len(s) else e.reshape(())
            return s

        def walk(s: Any) -> Any:
            if isinstance(s, torch.Size):
                return mk(s)
            if isinstance(s, (tuple, list)):
                return tuple(walk(v) for v in s)
            return s

        return walk(shapes) if shapes is not None else None

    def _block_args(self, args: Any, kwargs: Any, reason: str) -> None:
        for t in tensors((args, kwargs)):
            self.el.block(t, reason)

    def _unknown(self, args: Any, kwargs: Any, what: str) -> Any:
        reason = f"passes through {what}, which channel surgery does not support"
        self._block_args(args, kwargs, reason)
        return self._opaque(reason)

    def _spatial(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """A channel-preserving op that changes only spatial dims (pooling, interpolation, spatial padding)."""
        assert self.node is not None
        out_shape = meta_shapes(self.node)
        vd = varying_dims(t)
        if len(vd) <= 1 and isinstance(out_shape, torch.Size) and len(out_shape) == t.dim():
            d = vd[0] if vd else 1
            if d < len(out_shape) and out_shape[d] == t.shape[d]:
                return along(vector(t, d), d, out_shape)
        return self._unknown((t,), {}, what)

    # -- fx.Interpreter hooks --
    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        try:
            out = super().run_node(n)
            self._track_widths(n)
            return out
        except UnsupportedModel:
            raise
        except Exception as exc:  # noqa: BLE001 - an op we could not follow is treated as an unknown op
            if n.op in ("placeholder", "output"):
                raise
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            return self._unknown(args, kwargs, f"{self._where()} (not analysable: {msg})")

    def _track_widths(self, n: fx.Node) -> None:
        """Record which tensor's channel width a size value measures (see ``_reshape_problem``)."""
        def labels(a: Any) -> Any:
            return self.env.get(a) if isinstance(a, fx.Node) else None

        if (n.op == "call_method" and n.target == "size") or (
                n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape"):
            src = labels(n.args[0])
            if not isinstance(src, torch.Tensor):
                return
            vd = varying_dims(src)
            if not vd:
                return
            ids = frozenset(_distinct(src).tolist())
            dim = n.args[1] if n.op == "call_method" and len(n.args) > 1 else n.kwargs.get("dim")
            if isinstance(dim, int):
                if dim % src.dim() in vd:
                    self.width_of[n.name] = [ids]
            else:
                self.size_of[n.name] = {k: ids for d in vd for k in (d, d - src.dim())}
            return
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            src = self.size_of.get(n.args[0].name)
            if src is not None and isinstance(n.args[1], int) and n.args[1] in src:
                self.width_of[n.name] = [src[n.args[1]]]
            return
        if n.op == "call_function" and not any(isinstance(labels(a), torch.Tensor) for a in n.args):
            found: list[frozenset[int]] = []
            fx.node.map_arg((n.args, n.kwargs), lambda a: found.extend(self.width_of.get(a.name, [])))
            if found:
                self.width_of[n.name] = found

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        real = super().placeholder(target, args, kwargs)
        if isinstance(real, torch.Tensor):
            return self.el.new(1, "model input").expand(real.shape).contiguous()
        return real

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        real = super().get_attr(target, args, kwargs)
        if not isinstance(real, torch.Tensor) or not (real.is_floating_point() or real.is_complex()):
            return real  # integer/bool tensors are indices or masks, not channel data
        name = str(target)
        assert self.node is not None
        if not any(tracks_labels(u) for u in self.node.users):
            # e.g. a weight handed to a functional op we do not analyse (Swin's attention): one blocked element
            reason = f"tensor '{name}' feeds an operation channel surgery does not support"
            return self.el.new(1, reason).expand(real.shape)
        if name not in self.g.params:
            if real.numel() > 4_000_000:
                ids = self.el.new(1, f"tensor '{name}' is too large to track").expand(
                    real.shape).contiguous()
            else:
                ids = self.el.new(real.numel()).reshape(real.shape)
            self.g.params[name] = Param(name, ids)
        return self.g.params[name].ids

    def output(self, target: Any, args: Any, kwargs: Any) -> Any:
        self._block_args(args, kwargs, "reaches the model's output")
        return args[0]

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        name = str(target)
        m = self.g.model.get_submodule(name)
        x = args[0] if args else None
        if isinstance(m, CONV):
            return self._conv(name, m, x)
        if isinstance(m, nn.Linear):
            return self._linear(name, m, x)
        if isinstance(m, NORM):
            out = self._norm(name, m, x)
            extra = list(m.children())  # timm's BatchNormAct2d & co. apply an activation (and dropout) inside
            if extra:
                odd = [c for c in extra if not _elementwise(c)]
                if odd:
                    return self._unknown(args, kwargs, f"{self._where()} with {type(odd[0]).__name__} inside")
                if any(isinstance(c, RELU_MODULES) for c in extra):
                    self._relu_site(x)  # the node's output is post-ReLU, as APoZ expects
            return out
        if isinstance(m, PASS_MODULES):
            if isinstance(m, RELU_MODULES):
                self._relu_site(x)
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                return self._unknown(args, kwargs, self._where())
            return x
        if isinstance(m, SPATIAL_MODULES):
            return self._spatial(x, self._where())
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return m(x)
        why = self.g.gm.meta.get("opaque", {}).get(name)
        return self._unknown(args, kwargs, f"{self._where()} (kept whole: {why})" if why else self._where())

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not tensors((args, kwargs)):
            return target(*args, **kwargs)
        if target in RELU_FUNCS:
            self._relu_site(args[0])
        if target in PASS_FUNCS:
            return args[0]
        if target in BINARY_FUNCS:
            return self._binary(args, kwargs)
        if target in SPATIAL_FUNCS:
            if target is F.pad:
                return self._pad(args, kwargs)
            return self._spatial(args[0], self._where())
        if target in MOVE_FUNCS:
            return self._move(target, args, kwargs)
        if target in REDUCE_FUNCS:
            return self._reduce(args, kwargs)
        if target in SOFTMAX_FUNCS:
            return self._softmax(args, kwargs)
        if target in POW_FUNCS:
            return args[0] if not isinstance(args[1], torch.Tensor) else self._binary(args, kwargs)
        return self._unknown(args, kwargs, self._where())

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        self_obj = args[0]
        if not isinstance(self_obj, torch.Tensor):
            return getattr(self_obj, target)(*args[1:], **kwargs)
        if target in ("relu", "relu_"):
            self._relu_site(self_obj)
        if target in PASS_METHODS:
            return self_obj
        if target in BINARY_METHODS:
            return self._binary(args, kwargs)
        if target in MOVE_METHODS:
            return self._move(target, args, kwargs)
        if target in REDUCE_METHODS:
            return self._reduce(args, kwargs)
        if target in ("softmax", "log_softmax"):
            return self._softmax(args, kwargs)
        if target in ("pow", "pow_"):
            return self_obj if not isinstance(args[1], torch.Tensor) else self._binary(args, kwargs)
        return self._unknown(args, kwargs, self._where())

    # -- op handlers --
    def _softmax(self, args: Any, kwargs: Any) -> Any:
        """softmax along a dim whose channel classes are all the same (SKNet's and ResNeSt's attention over their
        coupled paths) acts on each channel separately; along channels it is an op we do not follow."""
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(dim, int):
            return self._unknown(args, kwargs, self._where())
        if dim % x.dim() in varying_dims(self.el.roots(x)):
            return self._unknown(args, kwargs, f"{self._where()} over the channel dimension")
        return x

    def _relu_site(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and self.node is not None:
            dim = 1 if t.dim() >= 3 else t.dim() - 1
            self.g.relu_sites.append(ReluSite(self.node.name, dim, t))

    def _read(self, name: str, role: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Record that ``name`` reads positions along ``dim`` of ``x``; union what shares a position."""
        dim = dim % x.dim()
        rows = x.movedim(dim, -1).reshape(-1, x.shape[dim])
        if not bool((rows == rows[:1]).all()):  # usually every position reads the same labels
            rows = torch.unique(rows, dim=0)
        else:
            rows = rows[:1]
        for r in rows[1:]:
            self.el.union_pairs(rows[0], r)
        self.g.consumers.append(Consumer(name, role, rows[0].clone()))
        return rows[0]

    def _produce(self, name: str, n_out: int, dim: int) -> torch.Tensor:
        assert self.node is not None
        shape = meta_shapes(self.node)
        if name not in self.g.producer_ids:
            self.g.producer_ids[name] = self.el.new(n_out)
            self.g.order.append(name)
        return along(self.g.producer_ids[name], dim % len(shape), shape)

    def _conv(self, name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if m.groups == 1:
            self._read(name, "in", x, 1)
            return self._produce(name, m.out_channels, 1)
        if m.groups == m.in_channels == m.out_channels:
            shape = meta_shapes(self.node)  # type: ignore[arg-type]
            vec = self._read(name, "dw", x, 1)
            return along(vec, 1, shape)
        w_in, w_out = m.in_channels // m.groups, m.out_channels // m.groups
        if 1 < w_in == w_out <= self.g.whole_groups_up_to:
            # A grouped conv with narrow groups (RegNet-X-400MF: 16 channels each) loses whole groups: group j's
            # inputs and outputs form one class, so the conv keeps its group width and its group count drops.
            # Narrowing each group instead buys little time on ONNX Runtime's CPU kernels: RegNet-X-400MF's
            # grouped convs at 8 channels per group ran at 0.74-0.96x their dense time for a quarter of the
            # MACs, at half their groups 0.56-0.70x for half (benchmarks/grouped_conv.py, docs/latency-target-log.md).
            vec = self._read(name, "groups", x, 1).reshape(m.groups, w_in)
            out = self._produce(name, m.out_channels, 1)
            ids = self.g.producer_ids[name].reshape(m.groups, w_out)
            row = torch.cat([vec, ids], dim=1)  # [groups, w_in + w_out]
            self.el.union_pairs(row[:, :1].expand(-1, row.shape[1] - 1).reshape(-1), row[:, 1:].reshape(-1))
            return out
        if w_in > 1:
            # A grouped conv (ResNeXt, RegNet) stays valid when every group keeps the same number of input and
            # of output channels. Coupling the channel at relative position j of every group guarantees that
            # (Torch-Pruning does the same): input position j and output position j are then each pruned in
            # all groups at once, the conv keeps its group count, and its weight [C_out, w_in, k, k] is sliced
            # along dim 1 by the kept relative input positions.
            vec = self._read(name, "grouped", x, 1).reshape(m.groups, w_in)
            for G in range(1, m.groups):
                self.el.union_pairs(vec[0], vec[G])
            out = self._produce(name, m.out_channels, 1)
            ids = self.g.producer_ids[name].reshape(m.groups, w_out)
            for G in range(1, m.groups):
                self.el.union_pairs(ids[0], ids[G])
            return out
        reason = (f"convolution '{name}' with a channel multiplier (groups={m.groups}, "
                  f"{m.out_channels} outputs from {m.in_channels} inputs) keeps its channel structure")
        self.el.block(x, reason)
        if name not in self.g.producer_ids:
            self.g.producer_ids[name] = self.el.new(m.out_channels, reason)
            self.g.order.append(name)
        return along(self.g.producer_ids[name], 1, meta_shapes(self.node))  # type: ignore[arg-type]

    def _linear(self, name: str, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        self._read(name, "in", x, -1)
        return self._produce(name, m.out_features, -1)

    def _norm(self, name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                return self._unknown((x,), {}, f"{self._where()} over {len(m.normalized_shape)} dims")
            n = m.normalized_shape[0]
            cands = [d for d in varying_dims(x) if x.shape[d] == n] or [d for d in range(x.dim())
                                                                           if x.shape[d] == n]
            dim = cands[-1] if type(m) is nn.LayerNorm and (x.dim() - 1) in cands else (cands[0] if cands
                                                                                          else None)
            if type(m) is nn.LayerNorm:
                dim = x.dim() - 1
            if dim is None:
                return self._unknown((x,), {}, self._where())
        else:
            dim = 1
        self._read(name, "norm", x, dim)
        return x

    def _binary(self, args: Any, kwargs: Any) -> Any:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return a if isinstance(a, torch.Tensor) else b
        shape = torch.broadcast_shapes(a.shape, b.shape)
        ea, eb = a.expand(shape), b.expand(shape)

        def broadcast_over_varying(p: torch.Tensor, q: torch.Tensor) -> bool:
            # p is broadcast along a dim where q's labels vary: p is shared by q's channels, not coupled.
            off = len(shape) - p.dim()
            qv = set(varying_dims(q.expand(shape)))
            return any(d + off in qv for d in range(p.dim()) if p.shape[d] == 1 and shape[d + off] > 1) or (
                off > 0 and any(d < off for d in qv))

        if broadcast_over_varying(b, a):
            return ea.contiguous()
        if broadcast_over_varying(a, b):
            return eb.contiguous()
        self.el.union_pairs(ea, eb)
        return ea.contiguous()

    def _pad(self, args: Any, kwargs: Any) -> Any:
        x, pad = args[0], args[1] if len(args) > 1 else kwargs["pad"]
        padded_dims = {x.dim() - 1 - i // 2 for i, p in enumerate(pad) if p}
        if set(varying_dims(x)) & padded_dims:
            return self._unknown(args, kwargs, "padding along the channel dimension")
        return self._spatial(x, self._where())

    def _reduce(self, args: Any, kwargs: Any) -> Any:
        x = args[0]
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if dims is None:
            return self._unknown(args, kwargs, "a full reduction")
        dims = [d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
        vd = varying_dims(x)
        rest = [d for d in vd if d not in dims]
        if len(vd) > 1 and len(rest) == 1:
            # summing (or max-ing) stacked copies of the channels, e.g. SKNet's paths [B, paths, C, H, W] summed
            # over paths: the same as adding the slices, so position j of every slice is coupled
            for d in vd:
                if d in dims:
                    for i in range(1, x.shape[d]):
                        self.el.union_pairs(x.narrow(d, 0, 1), x.narrow(d, i, 1))
            vd = rest
        if len(vd) > 1 or (vd and vd[0] in dims):
            return self._unknown(args, kwargs, f"{self._where()} over the channel dimension")
        d = vd[0] if vd else 1
        if d >= x.dim():
            return self._unknown(args, kwargs, self._where())
        out_shape = meta_shapes(self.node)  # type: ignore[arg-type]
        d_out = d if keep else d - sum(1 for r in dims if r < d)
        idx = [0] * x.dim()
        idx[d] = slice(None)
        return along(x[tuple(idx)].reshape(-1), d_out, out_shape)

    def _move(self, target: Any, args: Any, kwargs: Any) -> Any:
        assert self.node is not None
        x = args[0]
        if target in RESHAPES and isinstance(x, torch.Tensor):
            shape = kwargs.get("shape", kwargs.get("size", args[1:]))
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
            before = varying_dims(x)
            out = x.reshape(*shape)
            if before:
                why = self._reshape_problem(out, before) or self._sized_by_other(x)
                if why and self._stored_view(x, out, before):
                    why = None
                if why:
                    self.el.block(x, f"passes through {why} at node {self.node.name}")
            return out
        out = getattr(x, target)(*args[1:], **kwargs) if isinstance(target, str) else target(*args, **kwargs)
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if isinstance(x, torch.Tensor) and name in SLICING:
            self._check_slicing(name, x, args, kwargs)
        return out

    def _stored_view(self, x: torch.Tensor, out: torch.Tensor, before: list[int]) -> bool:
        """A view that only adds or drops unit dims around the channels, with their width written as a literal
        that a module stores (the layer scale of PoolFormer and other MetaFormers: ``self.scale.view(self.shape)``
        with ``shape = (dim, 1, 1)``): recorded so the surgery rewrites the width in that attribute."""
        assert self.node is not None
        after = varying_dims(out)
        sizes = self.node.kwargs.get("shape", self.node.kwargs.get("size", self.node.args[1:]))
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        if len(before) != 1 or len(after) != 1 or not all(type(v) is int for v in sizes) \
                or len(sizes) != out.dim():
            return False
        d = after[0]
        vec = vector(x, before[0])
        if not torch.equal(vec, vector(out, d)) or sizes[d] != len(vec) or any(
                v != 1 for i, v in enumerate(sizes) if i != d):
            return False
        site = self._size_site(list(sizes), [vec], slots=[d])
        if site is None:
            return False
        self.g.size_sites.append(site)
        return True

    def _sized_by_other(self, x: torch.Tensor) -> str | None:
        """A size computed from *another* tensor's channel count (Swin-style ``qkv.reshape(B, N, 3, heads,
        C // heads)`` with ``C`` read from the block's input) ties two widths we would prune independently."""
        assert self.node is not None
        found: list[frozenset[int]] = []
        fx.node.map_arg((self.node.args[1:], self.node.kwargs),
                        lambda a: found.extend(self.width_of.get(a.name, [])))
        mine = frozenset(_distinct(x).tolist())
        others = [f for f in found if f != mine]
        if not others:
            return None
        reason = "a reshape sized by another tensor's channel count"
        for f in others:
            self.el.block(torch.tensor(sorted(f), dtype=torch.long), f"passes through {reason} at node "
                          f"{self.node.name}")
        return reason

    def _size_args(self, ndim: int) -> list[Any] | None:
        """The requested size of each output dim of the current view/reshape node, as written in the code: an
        ``int`` literal, or an fx node (a size computed at run time). None when they cannot be matched up."""
        assert self.node is not None
        n = self.node
        sizes: Any = n.kwargs.get("shape", n.kwargs.get("size", n.args[1:]))
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        sizes = list(sizes)
        return sizes if len(sizes) == ndim else None

    def _reshape_problem(self, out: torch.Tensor, before: list[int]) -> str | None:
        """Why a reshape of a tensor whose labels vary along ``before`` is unsafe to prune through, or None.

        A size written as a literal along a dim that carries channels is fixed in the code, so the pruned
        model would no longer fit it: blocked. A reshape that splits the channel dim into ``(g, C // g)``
        (channel shuffle, grouped attention) with the literal ``g`` and a computed ``C // g`` stays valid when
        every one of the ``g`` slices loses the same positions, so channel j of each slice is coupled.
        """
        after = varying_dims(out)
        sizes = self._size_args(out.dim())
        flat: list[Any] = []
        fx.node.map_aggregate(self.node.args[1:], flat.append)  # type: ignore[union-attr]
        if sizes is None:  # e.g. view(other.size()): sizes cannot be matched to dims
            sizes = [v for v in flat if not isinstance(v, (tuple, list))]
            if len(sizes) != out.dim():
                sizes = [None] * out.dim()
        literal = {d for d, v in enumerate(sizes) if isinstance(v, int) and not isinstance(v, bool) and v > 1}
        # Conservative on purpose: a literal anywhere (even a spatial window size, as in MaxViT's partitions)
        # blocks, because the computed sizes next to it may come from another tensor whose width we prune.
        if len(after) <= len(before) or len(before) != 1:
            if literal:
                return "a reshape with a hard-coded size"
            return None if len(after) <= len(before) else "a reshape that splits the channel dimension"
        groups = [d for d in after if d in literal]
        units = [d for d in after if d not in literal]
        if (len(units) != 1 or not groups or literal - set(groups)
                or after != list(range(after[0], after[-1] + 1))):
            return "a reshape that splits the channel dimension into hard-coded sizes"
        idx = [slice(None) if d in after else 0 for d in range(out.dim())]
        t = out[tuple(idx)].movedim(after.index(units[0]), -1)
        rows = t.reshape(-1, t.shape[-1])
        for r in rows[1:]:
            self.el.union_pairs(rows[0], r)
        return None

    def _couple_equal_chunks(self, name: str, x: torch.Tensor, dim: int, args: Any, kwargs: Any) -> bool:
        """``chunk(k)`` (or ``split`` by a computed size) along the channel dim cuts the pruned width into equal
        parts at run time: that matches the analysis when every part loses the same positions, so position j
        of each part is coupled. Returns False when the cut is not of that kind."""
        assert self.node is not None
        n = x.shape[dim]
        if name == "chunk":
            k = kwargs.get("chunks", args[1] if len(args) > 1 else None)
        elif name == "split":
            size_arg = self.node.kwargs.get("split_size_or_sections", self.node.kwargs.get(
                "split_size", self.node.args[1] if len(self.node.args) > 1 else None))
            size = kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1] if len(args) > 1 else None))
            if not isinstance(size_arg, fx.Node) or not isinstance(size, int) or size <= 0 or n % size:
                return False
            k = n // size
        else:
            return False
        if not isinstance(k, int) or k <= 1 or n % k:
            return False
        parts = vector(x, dim).reshape(k, n // k)
        for r in parts[1:]:
            self.el.union_pairs(parts[0], r)
        return True

    def _check_slicing(self, name: str, x: torch.Tensor, args: Any, kwargs: Any) -> None:
        """Splitting or slicing along a channel dim fixes positions at trace time, but at run time the pruned
        width decides where a chunk or ``x[:, :8]`` cuts, so channels there cannot be removed safely, unless the
        cut adapts to the pruned width (``chunk``, a size computed from the tensor), covers the whole width, or
        its sizes are attributes of the module that the surgery can rewrite (:meth:`_literal_cut`)."""
        varying = set(varying_dims(x))
        if not varying:
            return
        if name == "getitem" or name == "__getitem__":
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(i is Ellipsis or i is None or isinstance(i, torch.Tensor) for i in idx):
                cut = varying  # advanced indexing: be conservative
            else:
                cut = {d for d, i in enumerate(idx) if not (isinstance(i, slice) and i == slice(None))}
        else:
            pos = 1 if name in ("unbind", "narrow") else 2  # torch.split(x, sizes, dim) / x.narrow(dim, ...)
            dim = kwargs.get("dim", args[pos] if len(args) > pos else 0)
            cut = {int(dim) % x.dim()} if isinstance(dim, int) else varying
        if cut & varying:
            assert self.node is not None
            if varying == cut and len(cut) == 1:
                d = next(iter(cut))
                if self._couple_equal_chunks(name, x, d, args, kwargs) or self._literal_cut(name, x, d):
                    return
            self.el.block(x, f"is split or sliced along the channel dimension at node {self.node.name}")

    def _literal_cut(self, name: str, x: torch.Tensor, dim: int) -> bool:
        """A split or slice along the channel dim at sizes written as literals in the graph.

        * a slice that keeps the whole width (GhostNet's ``out[:, :self.out_chs]`` after concatenating exactly
          ``out_chs`` channels), or a split whose one part is the whole width, cuts nothing at any pruned width;
        * otherwise the literals must be attributes of the module running the op (sizes.py finds and verifies
          them): a slice bound becomes the number of surviving channels before it, a list of split sizes the
          surviving count of each part (every part keeps at least one channel), and an equal split by one size
          (Res2Net's ``split(out, self.width)``) couples position j of every part, as ``chunk`` does, so all
          parts keep the same count and the one size stays valid.

        Returns False when the cut is none of these (the caller blocks it)."""
        assert self.node is not None
        node, n = self.node, x.shape[dim]
        vec = vector(x, dim)
        if name in ("getitem", "__getitem__"):
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            sl = idx[dim] if dim < len(idx) else None
            if not isinstance(sl, slice) or sl.step not in (None, 1) or any(
                    b is not None and type(b) is not int for b in (sl.start, sl.stop)):
                return False  # a bound computed at run time (or from another tensor): not ours to rewrite
            start, stop = sl.start or 0, sl.stop
            if start < 0 or (stop is not None and stop < 0):
                return False
            end = n if stop is None else min(stop, n)
            if start == 0 and end == n:
                return True
            if start >= end:
                return False
            bounds = ([start] if start else []) + ([stop] if stop is not None and stop < n else [])
            sites = [self._size_site(b, [vec[:b]]) for b in bounds]
            if any(st is None for st in sites):
                return False
            self.g.size_sites.extend(sites)  # type: ignore[arg-type]
            self.g.keep_one.append((vec[start:end].clone(), f"the slice at node {node.name}"))
            return True
        if name != "split":
            return False
        sizes = node.kwargs.get("split_size_or_sections", node.kwargs.get(
            "split_size", node.args[1] if len(node.args) > 1 else None))
        if type(sizes) is int:
            if sizes >= n:
                return True
            if sizes <= 0 or n % sizes:
                return False
            site = self._size_site(sizes, [vec[:sizes]])
            if site is None:
                return False
            parts = vec.reshape(n // sizes, sizes)
            for r in parts[1:]:
                self.el.union_pairs(parts[0], r)
            self.g.size_sites.append(site)
            return True
        if not isinstance(sizes, (list, tuple)) or not all(type(v) is int and v > 0 for v in sizes) or \
                sum(sizes) != n:
            return False
        bounds = [0]
        for v in sizes:
            bounds.append(bounds[-1] + v)
        parts = [vec[a:b].clone() for a, b in zip(bounds, bounds[1:])]
        site = self._size_site(list(sizes), parts, slots=list(range(len(parts))))
        # or one int attribute per part (FasterNet's ``split(x, [self.dim_conv3, self.dim_untouched])``)
        sites = [site] if site is not None else [self._size_site(v, [p]) for v, p in zip(sizes, parts)]
        if any(st is None for st in sites):
            return False
        self.g.size_sites.extend(sites)  # type: ignore[arg-type]
        self.g.keep_one.extend((p, f"part {i} of the split at node {node.name}") for i, p in enumerate(parts))
        return True

    def _size_site(self, literal: int | list[int], parts: list[torch.Tensor], slots: list[int] | None = None
                   ) -> SizeSite | None:
        """The module attribute the current node's ``literal`` comes from, as a :class:`SizeSite`, or None."""
        assert self.node is not None
        stack = self.node.meta.get("nn_module_stack") or {}
        owner = str(list(stack.values())[-1][0]) if stack else ""  # "" = an op in the root module's forward
        try:
            module = self.g.model.get_submodule(owner)
        except AttributeError:
            return None
        node = self.node
        inside = [n for n in self.g.gm.graph.nodes if n.op == node.op and n.target == node.target and (
            not owner or any(str(v[0]) == owner or str(v[0]).startswith(owner + ".")
                             for v in (n.meta.get("nn_module_stack") or {}).values()))]
        found = find_size_attr(module, literal, (node.op, node.target, inside.index(node)), self.size_cache)
        if found is None:
            return None
        attr, scale = found
        return SizeSite(self.node.name, owner, attr, scale, [p.clone() for p in parts], slots)
