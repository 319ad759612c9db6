"""Channel dependency analysis on a torch.fx trace.

How it works (docs/design.md has the long form):

* Every output channel of every conv/linear layer (a *producer*) is an **element**; so is every entry of a
  parameter or buffer read with ``get_attr`` (ConvNeXt's layer scale, ViT's class token and position
  embedding), and every tensor the analysis cannot see through gets one *blocked* element.
* The traced graph is interpreted on **label tensors**: int64 tensors with the real activation's shape whose
  entries are element ids. Data-movement ops (cat, split, chunk, slicing, permute, reshape, flatten, ...) run
  unchanged on the labels, so concatenation offsets, splits and flatten-into-linear come out exactly.
  Element-wise binary ops (residual adds, squeeze-and-excitation products, position embeddings) *union* the
  elements they combine; consumers (conv/linear inputs, norm layers, depthwise convs) union what they read
  at each input position.
* After the pass, each union-find class is one prunable **channel**: removing it removes every member
  together, so coupled layers stay consistent by construction. A class that touches anything blocked
  (the model's input or output, an op we do not understand, a conv with a channel multiplier...) is left
  alone, and the reason is kept for the report.
* A **group** is a set of classes tied together through their producer layers (a residual stage, a single
  conv, a concat branch); criteria score channels and the planner chooses per group.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from deploy_prune.errors import UnsupportedModel

# ----------------------------------------------------------------------------------------------------------
# public result types


@dataclass(frozen=True)
class Channel:
    """One prunable channel: every member below is removed together.

    Attributes:
        root: the union-find class id (stable for one analysis).
        producers: ``(module, output index)`` of each conv/linear layer that writes this channel.
        norms: ``(module, index)`` of each norm layer (BN/LN/GN/IN) that scales this channel.
        relus: ``(fx node, dim, index)`` where this channel is the input of a ReLU (APoZ reads these).
    """

    root: int
    producers: tuple[tuple[str, int], ...]
    norms: tuple[tuple[str, int], ...] = ()
    relus: tuple[tuple[str, int, int], ...] = ()


@dataclass
class Group:
    """Channels coupled through their producer layers; the unit a per-layer ratio applies to."""

    id: int
    modules: tuple[str, ...]
    channels: list[Channel]
    multiple_of: int = 1  # kept *channel* count must be a multiple of this (GroupNorm groups)
    channels_per_class: int = 1  # channels each class removes from one layer (a grouped conv's group count)
    grouped: bool = False  # classes span the groups of a grouped conv: the class count is each group's width

    @property
    def size(self) -> int:
        return len(self.channels)


@dataclass
class _Consumer:
    """A module reading labelled positions along ``dim`` of its input (conv/linear input, norm, depthwise)."""

    name: str
    role: str  # "in" (conv/linear input), "norm", "dw" (depthwise), "grouped" (grouped conv input)
    labels: torch.Tensor  # 1-D: element id at each position along dim


@dataclass
class _Param:
    name: str  # qualified parameter/buffer name
    ids: torch.Tensor  # element id per entry (same shape as the tensor)


@dataclass
class _ReluSite:
    node: str
    dim: int
    labels: torch.Tensor  # 1-D labels along dim


# ----------------------------------------------------------------------------------------------------------
# union-find over element ids


def _distinct(t: torch.Tensor) -> torch.Tensor:
    """``torch.unique(t)``, after dropping the dims along which ``t`` is constant (a cheap O(n) check that
    spares sorting whole activations, which are mostly constant over space)."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and bool((t == t.narrow(d, 0, 1)).all()):
            t = t.narrow(d, 0, 1)
    return torch.unique(t)


class _Elements:
    """Union-find over element ids, vectorised where it matters (ids can number in the millions)."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)
        self.size = 0
        self._blocked: list[tuple[np.ndarray, str]] = []  # (ids, reason), in the order they were blocked
        self._frozen: np.ndarray | None = None

    def new(self, n: int, kind: str, name: str, reason: str | None = None) -> torch.Tensor:
        start = self.size
        if start + n > len(self.parent):
            grown = np.arange(max(2 * len(self.parent), start + n, 1024), dtype=np.int64)
            grown[:start] = self.parent[:start]
            self.parent = grown
        self.size = start + n
        ids = np.arange(start, start + n, dtype=np.int64)
        if reason is not None:
            self._blocked.append((ids, reason))
        self._frozen = None
        return torch.from_numpy(ids.copy())

    def find(self, e: int) -> int:
        p = self.parent
        root = int(e)
        while p[root] != root:
            root = int(p[root])
        while p[e] != root:
            nxt = int(p[e])
            p[e] = root
            e = nxt
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra
            self._frozen = None

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        n = self.size
        keys = _distinct(a * n + b)  # one 1-D unique is far faster than unique(dim=0) on pairs
        for k in keys.tolist():
            x, y = divmod(k, n)
            if x != y:
                self.union(x, y)

    def block(self, labels: torch.Tensor, reason: str) -> None:
        self._blocked.append((_distinct(labels).numpy(), reason))

    def _compressed(self) -> np.ndarray:
        if self._frozen is None:
            p = self.parent[: self.size].copy()
            while True:
                q = p[p]
                if np.array_equal(q, p):
                    break
                p = q
            self._frozen = p
        return self._frozen

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._compressed()[labels.reshape(-1).numpy()]).reshape(labels.shape)

    def blocked_roots(self) -> dict[int, str]:
        """Root → the first reason any of its elements was blocked."""
        comp = self._compressed()
        out: dict[int, str] = {}
        for ids, why in self._blocked:
            for r in np.unique(comp[ids]).tolist():
                out.setdefault(r, why)
        return out


# ----------------------------------------------------------------------------------------------------------
# op tables

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.Identity, nn.PReLU)
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                    nn.UpsamplingBilinear2d)
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu6, F.relu_}

_PASS_FUNCS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
    torch.sigmoid, F.tanh, torch.tanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, operator.neg, torch.neg, torch.abs, torch.exp,
    torch.sqrt, torch.rsqrt, torch.erf,
}
try:  # torchvision wraps these for torch.fx; both act per sample or per element, never across channels
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    _PASS_FUNCS.add(_tv_stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "neg", "abs",
    "exp", "sqrt", "float", "half", "double", "to", "type_as", "clone", "detach", "contiguous", "requires_grad_",
    "hardswish", "hardswish_", "erf",
}
_SPATIAL_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate, F.upsample, F.pad}
_BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                 operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                 torch.maximum, torch.minimum, torch.max, torch.min}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_MOVE_FUNCS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.split, torch.chunk,
               torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
               operator.getitem, torch.narrow, torch.unbind, torch.roll, torch.flip, torch.movedim,
               torch.swapaxes, getattr, torch.tensor_split}
_MOVE_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "expand",
                 "expand_as", "chunk", "split", "unbind", "narrow", "size", "dim", "flip", "roll", "movedim",
                 "swapaxes", "unflatten", "tensor_split", "__getitem__", "numel"}
_RESHAPES = {"view", "reshape", torch.reshape}
_SLICING = {"split", "chunk", "tensor_split", "unbind", "narrow", "getitem", "__getitem__"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


def _varying_dims(t: torch.Tensor) -> list[int]:
    return [d for d in range(t.dim()) if t.shape[d] > 1 and bool((t != t.narrow(d, 0, 1)).any())]


def _vector(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The 1-D labels along ``dim`` of a label tensor that is constant along every other dim."""
    idx = [0] * t.dim()
    idx[dim] = slice(None)
    return t[tuple(idx)].reshape(-1)


def _along(vec: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return vec.view(view).expand(shape).contiguous()


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    fx.node.map_aggregate(obj, lambda v: out.append(v) if isinstance(v, torch.Tensor) else None)
    return out


def _meta_shapes(node: fx.Node) -> Any:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    def conv(m: Any) -> Any:
        if isinstance(getattr(m, "shape", None), torch.Size):  # TensorMetadata is itself a NamedTuple
            return m.shape
        if isinstance(m, (tuple, list)):
            return type(m)(conv(v) for v in m) if not hasattr(m, "_fields") else tuple(conv(v) for v in m)
        return m

    return conv(meta)


def _tracks_labels(n: fx.Node) -> bool:
    """Whether node ``n`` is an op whose channel semantics the propagator understands."""
    if n.op == "call_function":
        t = n.target
        return t in _BINARY_FUNCS or t in _MOVE_FUNCS or t in _PASS_FUNCS or t in _SPATIAL_FUNCS or t in _REDUCE_FUNCS
    if n.op == "call_method":
        t = n.target
        return t in _BINARY_METHODS or t in _MOVE_METHODS or t in _PASS_METHODS or t in _REDUCE_METHODS
    return n.op in ("call_module", "output")


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every norm layer (and subclasses such as ConvNeXt's LayerNorm2d) kept whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _NORM + _CONV + (nn.Linear,)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a model that cannot be traced gets an error naming the op and module."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes a user-facing message
        where = ""
        stack = getattr(tracer, "module_stack", None)
        if stack:
            names = [k for k in stack.keys() if k]
            if names:
                where = f" inside module '{names[-1]}'"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModel(
            f"cannot trace the model{where}: {type(exc).__name__}: {msg[:300]}; channel surgery needs a "
            "torch.fx-traceable forward (no data-dependent Python control flow); wrap the offending code in "
            "a leaf module or use --ignore to skip it"
        ) from None
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


# ----------------------------------------------------------------------------------------------------------
# the analysis


class DependencyGraph:
    """The result of :func:`analyze`: groups of coupled channels and how to remove them."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, example_shape: tuple[int, ...]) -> None:
        self.model = model
        self.gm = gm
        self.example_shape = tuple(example_shape)
        self.el = _Elements()
        self.producer_ids: dict[str, torch.Tensor] = {}  # module -> element id per output channel
        self.consumers: list[_Consumer] = []
        self.params: dict[str, _Param] = {}
        self.relu_sites: list[_ReluSite] = []
        self.groups: list[Group] = []
        self.skipped: dict[str, str] = {}  # producer module -> why none of its channels can be pruned
        self.order: list[str] = []  # producer modules in graph order

    # ---- queries used by criteria and the planner ----

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def input_positions(self, name: str) -> torch.Tensor | None:
        """The class root read at each input channel of conv/linear ``name`` (None if it has no record)."""
        for c in self.consumers:
            if c.name == name and c.role == "in":
                return self.el.roots(c.labels)
            if c.name == name and c.role == "grouped":  # the weight's dim 1 holds group 0's positions
                m = self.module(name)
                return self.el.roots(c.labels[: m.in_channels // m.groups])
        return None

    def layer_widths(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.producer_ids.items()}

    def capture(self, x: torch.Tensor, nodes: Iterable[str]) -> dict[str, torch.Tensor]:
        """Run the traced model on ``x`` and return the outputs of the named fx nodes."""
        wanted = set(nodes)
        got: dict[str, torch.Tensor] = {}

        class _Cap(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in wanted:
                    got[n.name] = out.detach()
                return out

        with torch.no_grad():
            _Cap(self.gm).run(x)
        return got


def analyze(model: nn.Module, example: torch.Tensor | tuple[int, ...], *,
            ignore: Iterable[str] = ()) -> DependencyGraph:
    """Trace ``model`` and find every group of coupled, prunable channels.

    Args:
        model: the network (it is not modified; it is put in eval mode).
        example: an example input, or its shape (batch 1 is enough).
        ignore: producer layers (qualified names, or prefixes ending in '.') never to prune.
    """
    model.eval()
    x = example if isinstance(example, torch.Tensor) else torch.randn(*example)
    gm = trace(model)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModel(
            f"the model does not run on an input of shape {tuple(x.shape)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}; pass the shape it expects with --input-shape"
        ) from None
    g = DependencyGraph(model, gm, tuple(x.shape))
    _Propagator(g).run(x)
    ignore = tuple(ignore)
    for name, ids in g.producer_ids.items():
        if any(name == p or (p.endswith(".") and name.startswith(p)) for p in ignore):
            g.el.block(ids, "ignored (--ignore)")
    _build_groups(g)
    return g


class _Propagator(fx.Interpreter):
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
        shapes = _meta_shapes(self.node)
        el = self.el

        def mk(s: Any) -> Any:
            if isinstance(s, torch.Size):
                e = el.new(1, "opaque", self.node.name, reason)
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
        for t in _tensors((args, kwargs)):
            self.el.block(t, reason)

    def _unknown(self, args: Any, kwargs: Any, what: str) -> Any:
        reason = f"passes through {what}, which channel surgery does not support"
        self._block_args(args, kwargs, reason)
        return self._opaque(reason)

    def _spatial(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """A channel-preserving op that changes only spatial dims (pooling, interpolation, spatial padding)."""
        assert self.node is not None
        out_shape = _meta_shapes(self.node)
        vd = _varying_dims(t)
        if len(vd) <= 1 and isinstance(out_shape, torch.Size) and len(out_shape) == t.dim():
            d = vd[0] if vd else 1
            if d < len(out_shape) and out_shape[d] == t.shape[d]:
                return _along(_vector(t, d), d, out_shape)
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
            vd = _varying_dims(src)
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
            return self.el.new(1, "input", str(target), "model input").expand(real.shape).contiguous()
        return real

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        real = super().get_attr(target, args, kwargs)
        if not isinstance(real, torch.Tensor) or not (real.is_floating_point() or real.is_complex()):
            return real  # integer/bool tensors are indices or masks, not channel data
        name = str(target)
        assert self.node is not None
        if not any(_tracks_labels(u) for u in self.node.users):
            # e.g. a weight handed to a functional op we do not analyse (Swin's attention): one blocked element
            reason = f"tensor '{name}' feeds an operation channel surgery does not support"
            return self.el.new(1, "opaque", name, reason).expand(real.shape)
        if name not in self.g.params:
            if real.numel() > 4_000_000:
                ids = self.el.new(1, "opaque", name, f"tensor '{name}' is too large to track").expand(
                    real.shape).contiguous()
            else:
                ids = self.el.new(real.numel(), "param", name).reshape(real.shape)
            self.g.params[name] = _Param(name, ids)
        return self.g.params[name].ids

    def output(self, target: Any, args: Any, kwargs: Any) -> Any:
        self._block_args(args, kwargs, "reaches the model's output")
        return args[0]

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        name = str(target)
        m = self.g.model.get_submodule(name)
        x = args[0] if args else None
        if isinstance(m, _CONV):
            return self._conv(name, m, x)
        if isinstance(m, nn.Linear):
            return self._linear(name, m, x)
        if isinstance(m, _NORM):
            return self._norm(name, m, x)
        if isinstance(m, _PASS_MODULES):
            if isinstance(m, _RELU_MODULES):
                self._relu_site(x)
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                return self._unknown(args, kwargs, self._where())
            return x
        if isinstance(m, _SPATIAL_MODULES):
            return self._spatial(x, self._where())
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return m(x)
        return self._unknown(args, kwargs, self._where())

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not _tensors((args, kwargs)):
            return target(*args, **kwargs)
        if target in _RELU_FUNCS:
            self._relu_site(args[0])
        if target in _PASS_FUNCS:
            return args[0]
        if target in _BINARY_FUNCS:
            return self._binary(args, kwargs)
        if target in _SPATIAL_FUNCS:
            if target is F.pad:
                return self._pad(args, kwargs)
            return self._spatial(args[0], self._where())
        if target in _MOVE_FUNCS:
            return self._move(target, args, kwargs)
        if target in _REDUCE_FUNCS:
            return self._reduce(args, kwargs)
        return self._unknown(args, kwargs, self._where())

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        self_obj = args[0]
        if not isinstance(self_obj, torch.Tensor):
            return getattr(self_obj, target)(*args[1:], **kwargs)
        if target in ("relu", "relu_"):
            self._relu_site(self_obj)
        if target in _PASS_METHODS:
            return self_obj
        if target in _BINARY_METHODS:
            return self._binary(args, kwargs)
        if target in _MOVE_METHODS:
            return self._move(target, args, kwargs)
        if target in _REDUCE_METHODS:
            return self._reduce(args, kwargs)
        return self._unknown(args, kwargs, self._where())

    # -- op handlers --
    def _relu_site(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and self.node is not None:
            dim = 1 if t.dim() >= 3 else t.dim() - 1
            self.g.relu_sites.append(_ReluSite(self.node.name, dim, t))

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
        self.g.consumers.append(_Consumer(name, role, rows[0].clone()))
        return rows[0]

    def _produce(self, name: str, n_out: int, dim: int) -> torch.Tensor:
        assert self.node is not None
        shape = _meta_shapes(self.node)
        if name not in self.g.producer_ids:
            self.g.producer_ids[name] = self.el.new(n_out, "out", name)
            self.g.order.append(name)
        return _along(self.g.producer_ids[name], dim % len(shape), shape)

    def _conv(self, name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if m.groups == 1:
            self._read(name, "in", x, 1)
            return self._produce(name, m.out_channels, 1)
        if m.groups == m.in_channels == m.out_channels:
            shape = _meta_shapes(self.node)  # type: ignore[arg-type]
            vec = self._read(name, "dw", x, 1)
            return _along(vec, 1, shape)
        w_in, w_out = m.in_channels // m.groups, m.out_channels // m.groups
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
            self.g.producer_ids[name] = self.el.new(m.out_channels, "out", name, reason)
            self.g.order.append(name)
        return _along(self.g.producer_ids[name], 1, _meta_shapes(self.node))  # type: ignore[arg-type]

    def _linear(self, name: str, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        self._read(name, "in", x, -1)
        return self._produce(name, m.out_features, -1)

    def _norm(self, name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                return self._unknown((x,), {}, f"{self._where()} over {len(m.normalized_shape)} dims")
            n = m.normalized_shape[0]
            cands = [d for d in _varying_dims(x) if x.shape[d] == n] or [d for d in range(x.dim())
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
            qv = set(_varying_dims(q.expand(shape)))
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
        if set(_varying_dims(x)) & padded_dims:
            return self._unknown(args, kwargs, "padding along the channel dimension")
        return self._spatial(x, self._where())

    def _reduce(self, args: Any, kwargs: Any) -> Any:
        x = args[0]
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if dims is None:
            return self._unknown(args, kwargs, "a full reduction")
        dims = [d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
        vd = _varying_dims(x)
        if len(vd) > 1 or (vd and vd[0] in dims):
            return self._unknown(args, kwargs, f"{self._where()} over the channel dimension")
        d = vd[0] if vd else 1
        if d >= x.dim():
            return self._unknown(args, kwargs, self._where())
        out_shape = _meta_shapes(self.node)  # type: ignore[arg-type]
        d_out = d if keep else d - sum(1 for r in dims if r < d)
        return _along(_vector(x, d), d_out, out_shape)

    def _move(self, target: Any, args: Any, kwargs: Any) -> Any:
        assert self.node is not None
        x = args[0]
        if target in _RESHAPES and isinstance(x, torch.Tensor):
            shape = kwargs.get("shape", kwargs.get("size", args[1:]))
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
            before = _varying_dims(x)
            out = x.reshape(*shape)
            if before:
                why = self._reshape_problem(out, before) or self._sized_by_other(x)
                if why:
                    self.el.block(x, f"passes through {why} at node {self.node.name}")
            return out
        out = getattr(x, target)(*args[1:], **kwargs) if isinstance(target, str) else target(*args, **kwargs)
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if isinstance(x, torch.Tensor) and name in _SLICING:
            self._check_slicing(name, x, args, kwargs)
        return out

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
        after = _varying_dims(out)
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
        parts = _vector(x, dim).reshape(k, n // k)
        for r in parts[1:]:
            self.el.union_pairs(parts[0], r)
        return True

    def _check_slicing(self, name: str, x: torch.Tensor, args: Any, kwargs: Any) -> None:
        """Splitting or slicing along a channel dim fixes positions at trace time, but at run time the pruned
        width decides where a chunk or ``x[:, :8]`` cuts, so channels there cannot be removed safely."""
        varying = set(_varying_dims(x))
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
            if varying == cut and len(cut) == 1 and self._couple_equal_chunks(name, x, next(iter(cut)), args, kwargs):
                return
            self.el.block(x, f"is split or sliced along the channel dimension at node {self.node.name}")


def _build_groups(g: DependencyGraph) -> None:
    el = g.el
    # Consistency: a position read by a consumer maps to one class (already unioned in _read).
    # Parameters read with get_attr: the entries of each class must form whole slices along one dim.
    for p in g.params.values():
        roots = el.roots(p.ids)
        if p.ids.numel() == 0:
            continue
        vd = _varying_dims(roots)
        if len(vd) > 1:
            el.block(p.ids, f"tensor '{p.name}' is coupled to channels along several dims")
    # class -> members
    producers: dict[int, list[tuple[str, int]]] = {}
    for name in g.order:
        for i, r in enumerate(el.roots(g.producer_ids[name]).tolist()):
            producers.setdefault(r, []).append((name, i))
    blocked_roots = el.blocked_roots()
    norms: dict[int, list[tuple[str, int]]] = {}
    for c in g.consumers:
        if c.role in ("norm", "dw"):
            for i, r in enumerate(el.roots(c.labels).tolist()):
                norms.setdefault(r, []).append((c.name, i))
    relus: dict[int, list[tuple[str, int, int]]] = {}
    for s in g.relu_sites:
        vd = _varying_dims(s.labels)
        if vd and vd != [s.dim]:
            continue
        for i, r in enumerate(el.roots(_vector(s.labels, s.dim)).tolist()):
            relus.setdefault(r, []).append((s.node, s.dim, i))
    # GroupNorm: kept channels must stay divisible by num_groups
    gn_groups: dict[str, int] = {c.name: g.model.get_submodule(c.name).num_groups for c in g.consumers
                                 if isinstance(g.model.get_submodule(c.name), nn.GroupNorm)}
    # classes read by, or written by, a grouped conv (its relative positions are coupled across groups)
    grouped_roots = {r for c in g.consumers if c.role == "grouped" for r in el.roots(c.labels).tolist()}
    grouped_mods = {n for n in g.order if isinstance(g.model.get_submodule(n), _CONV)
                    and 1 < g.model.get_submodule(n).groups < g.model.get_submodule(n).in_channels}
    # producer modules tied together through shared classes
    parent = {m: m for m in g.order}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for members in producers.values():
        for (a, _), (b, _) in zip(members, members[1:]):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra
    comps: dict[str, list[str]] = {}
    for m in g.order:
        comps.setdefault(find(m), []).append(m)
    gid = 0
    for mods in comps.values():
        roots = sorted({r for m in mods for r in el.roots(g.producer_ids[m]).tolist()},
                       key=lambda r: _first_index(producers[r], mods))
        chans = [Channel(r, tuple(producers[r]), tuple(norms.get(r, ())), tuple(relus.get(r, ())))
                 for r in roots if r not in blocked_roots]
        if not chans:
            why = next((blocked_roots[r] for r in roots if r in blocked_roots), "no prunable channels")
            for m in mods:
                g.skipped[m] = why
            continue
        mult = 1
        for r in roots:
            for n, _ in norms.get(r, ()):
                mult = max(mult, gn_groups.get(n, 1))
        partial = [blocked_roots[r] for r in roots if r in blocked_roots]
        if partial:
            for m in mods:
                g.skipped.setdefault(m, f"{len(partial)} of {len(roots)} channels kept: {partial[0]}")
        per_layer = {sum(1 for mm, _ in c.producers if mm == m) for c in chans for m in mods}
        per_class = max(per_layer) if len(per_layer - {0}) == 1 else 1
        grouped = bool(grouped_mods & set(mods)) or any(c.root in grouped_roots for c in chans)
        g.groups.append(Group(gid, tuple(mods), chans, mult, per_class, grouped))
        gid += 1


def _first_index(members: list[tuple[str, int]], mods: list[str]) -> tuple[int, int]:
    order = {m: i for i, m in enumerate(mods)}
    return min((order.get(m, len(order)), i) for m, i in members)
