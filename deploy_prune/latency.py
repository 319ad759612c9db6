"""A measured latency model: what each channel group's width costs on the run's own provider, threads and shape.

The model is a lookup table per layer, measured with ONNX Runtime itself (not FLOPs):

* Every conv and linear call of the dense model is a :class:`Site`: its op, attributes and input shape (batch
  included), and how its input and output widths depend on the channel groups the planner chooses from (a
  residual stage's convs read and write the same group; a conv after a concat reads several).
* For each site, a one-layer ONNX graph is timed on ORT at a small grid of input x output widths: a conv as
  Conv + Relu (ONNX Runtime fuses the two: the Relu stands for a ReLU, a ReLU6 or none), or, where the conv
  (through its BatchNorm) feeds a SiLU or GELU, which ONNX Runtime does not fuse, as Conv + that activation; a
  linear layer as Gemm, or MatMul + bias Add on a 3-D or 4-D input, followed by the activation the model
  applies to its output (GELU as the exporter writes it: Div, Erf, Add, Mul, Mul; ReLU; SiLU as Sigmoid, Mul),
  so that a width pays for its element-wise work too. Widths are multiples of the channel step; sessions have
  the benchmark's options. The run-to-run overhead of ``session.run`` itself (timed on a one-node model) is
  subtracted. Between grid points the table is interpolated bilinearly (a conv's time is close to bilinear in
  its input and output widths).
* A model's predicted latency is the sum over its sites. What the tables do not see (other element-wise ops,
  normalisations, pooling, layout reorders, fusions) is left to the caller, which calibrates predictions
  against whole-model measurements (:mod:`deploy_prune.target`).

Tables are cached on disk, one JSON file per environment (provider, threads, ONNX Runtime version, CPU, table
version), keyed inside by each site's configuration and width, so a second run, or another model with the same
layer shapes, reuses them. The cache lives in ``$DEPLOY_PRUNE_CACHE`` or ``$XDG_CACHE_HOME/deploy-prune`` (else
``~/.cache/deploy-prune``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn

from deploy_prune.surgery.graph import DependencyGraph
from deploy_prune.surgery.ops import CONV

TABLE_VERSION = 2  # 2: layers timed with the activation after them (and a linear layer's bias Add)
_GRID_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
"""The kept fractions of each width a site is timed at (rounded to the channel step). 0.1 is the planner's
default floor (``max_layer_ratio`` 0.9): with (0.25, 0.5, 1) only, every width under a quarter was
extrapolated from the quarter and the half. Over points of the ``latency`` and ``uniform`` trajectories at
1.5x-3x, the spread of measured / predicted speedup (std of its log) went from 0.104 to 0.088 on
RegNet-X-400MF, 0.100 to 0.090 on EfficientNet-B0, 0.163 to 0.155 on MobileNetV2, 0.024 to 0.029 on
ConvNeXt-T, and stayed at 0.028 / 0.025 on ResNet-18 / ResNet-50 (``benchmarks/table_grid.py``, CPU provider, 2
threads; docs/latency-target-log.md, "The tables now time the floor")."""
_REPEATS = 15
_WARMUP = 3


# ----------------------------------------------------------------------------------------------------------
# sites: the conv/linear calls of a model and how their widths follow the groups


@dataclass(frozen=True)
class Site:
    """One conv/linear call of the dense model, and how its widths depend on the channel groups.

    Attributes:
        name: the module's qualified name.
        op: ``"conv"`` or ``"linear"``.
        in_shape: the dense input shape of the call (batch included).
        out_channels: the dense output width.
        kernel, stride, padding, dilation: conv attributes (empty for linear).
        groups: the conv's group count (``depthwise`` convs have one channel per group).
        depthwise: input and output widths are the same channels (they shrink together).
        bias: whether the layer has a bias.
        in_fixed, in_counts: input width = ``in_fixed + sum(count * kept fraction of group g)``.
        out_fixed, out_counts: likewise for the output width.
        calls: how many times the forward calls the module.
        act: the activation applied to the layer's output, timed with it: for a linear layer ``"gelu"``,
            ``"relu"``, ``"silu"`` or ``""``; for a conv (through its BatchNorm) ``"gelu"`` or ``"silu"``, which
            ONNX Runtime does not fuse into the conv, else ``""`` (timed as a fused ReLU).
        group_width: for a grouped conv pruned by whole groups, the channels per group: its group count is
            its width divided by this (0: the group count stays ``groups``).
    """

    name: str
    op: str
    in_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    depthwise: bool = False
    bias: bool = True
    in_fixed: int = 0
    in_counts: tuple[tuple[int, int], ...] = ()
    out_fixed: int = 0
    out_counts: tuple[tuple[int, int], ...] = ()
    calls: int = 1
    act: str = ""
    group_width: int = 0

    @property
    def in_channels(self) -> int:
        return self.in_shape[1] if self.op == "conv" else self.in_shape[-1]

    def config(self) -> str:
        """What the measured time depends on, besides the widths (the cache key)."""
        return (f"{self.op}|in={'x'.join(map(str, self.in_shape))}|out={self.out_channels}|k={self.kernel}"
                f"|s={self.stride}|p={self.padding}|d={self.dilation}|g={self.groups}|dw={int(self.depthwise)}"
                f"|b={int(self.bias)}|a={self.act}" + (f"|gw={self.group_width}" if self.group_width else ""))

    def groups_touched(self) -> set[int]:
        return {g for g, _ in self.in_counts} | {g for g, _ in self.out_counts}

    def widths(self, frac: Mapping[int, float]) -> tuple[float, float]:
        """(input width, output width) when group ``g`` keeps the fraction ``frac[g]`` (1 when absent)."""
        cin = self.in_fixed + sum(c * frac.get(g, 1.0) for g, c in self.in_counts)
        cout = self.out_fixed + sum(c * frac.get(g, 1.0) for g, c in self.out_counts)
        if self.tied:
            cout = cin
        return cin, cout

    @property
    def tied(self) -> bool:
        """Input and output widths shrink together (a depthwise conv, or a conv losing whole groups)."""
        return self.depthwise or self.group_width > 0

    def macs(self) -> int:
        """Multiply-accumulates of the dense call (as :func:`deploy_prune.metrics.count_macs` counts them)."""
        if self.op == "linear":
            return math.prod(self.in_shape[:-1]) * self.in_channels * self.out_channels * self.calls
        spatial = [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, p, d, k, s in
                   zip(self.in_shape[2:], self.padding, self.dilation, self.kernel, self.stride)]
        per_out = (self.in_channels // self.groups) * math.prod(self.kernel)
        return self.in_shape[0] * math.prod(spatial) * self.out_channels * per_out * self.calls

    def macs_at(self, frac: Mapping[int, float]) -> float:
        """Multiply-accumulates of the call when each group ``g`` keeps the fraction ``frac[g]``: the dense count
        scaled by the output width and, where the channels per conv group follow the input width, the input
        width (a depthwise conv, or one losing whole groups, does one filter's work per output channel)."""
        cin, cout = self.widths(frac)
        full_in, full_out = self.widths({})
        scale = cout / max(full_out, 1)
        if not self.tied:
            scale *= cin / max(full_in, 1)
        return self.macs() * scale

    def align(self) -> int:
        """Widths must stay multiples of this (a grouped conv keeps its group count, or its group width)."""
        if self.group_width:
            return self.group_width
        return self.groups if (self.op == "conv" and self.groups > 1 and not self.depthwise) else 1


def _input_shape(node: fx.Node) -> tuple[int, ...] | None:
    arg = node.args[0] if node.args else None
    meta = getattr(arg, "meta", {}).get("tensor_meta") if isinstance(arg, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _counts(roots: Iterable[int], group_of: Mapping[int, int]) -> tuple[int, tuple[tuple[int, int], ...]]:
    fixed, per = 0, {}
    for r in roots:
        g = group_of.get(r)
        if g is None:
            fixed += 1
        else:
            per[g] = per.get(g, 0) + 1
    return fixed, tuple(sorted(per.items()))


_ACTS: tuple[tuple[type[nn.Module], str], ...] = ((nn.GELU, "gelu"), (nn.ReLU, "relu"), (nn.SiLU, "silu"))
_UNFUSED = ("gelu", "silu")  # activations ONNX Runtime does not fuse into a conv: a conv's site times them


def _activation(node: fx.Node, model: nn.Module, through_bn: bool = False) -> str:
    """The activation that alone consumes ``node``'s output (an exact-erf GELU, ReLU or SiLU), else ``""``;
    ``through_bn``: a BatchNorm between the two (folded into a conv by the exporter) is looked through."""
    if len(node.users) != 1:
        return ""
    user = next(iter(node.users))
    if user.op == "call_module":
        m = model.get_submodule(str(user.target))
        if through_bn and isinstance(m, nn.modules.batchnorm._BatchNorm):
            return _activation(user, model)
        if isinstance(m, nn.GELU) and m.approximate != "none":
            return ""
        return next((name for cls, name in _ACTS if isinstance(m, cls)), "")
    if user.op in ("call_function", "call_method") and len(user.args) == 1 \
            and user.kwargs.get("approximate", "none") == "none":
        name = getattr(user.target, "__name__", str(user.target))
        return name if name in {n for _, n in _ACTS} else ""
    return ""


def sites(graph: DependencyGraph, batch: int) -> list[Site]:
    """The conv/linear calls of the analysed model at ``batch``, with their dependence on the groups."""
    group_of = {ch.root: g.id for g in graph.groups for ch in g.channels}
    reads: dict[str, list[int]] = {}
    for c in graph.consumers:
        if c.role in ("in", "grouped", "groups", "dw") and c.name not in reads:
            reads[c.name] = graph.el.roots(c.labels).tolist()
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_module":
            m = graph.model.get_submodule(str(node.target))
            if isinstance(m, CONV + (nn.Linear,)):
                calls.setdefault(str(node.target), []).append(node)
    out: list[Site] = []
    for name, nodes in calls.items():
        m = graph.model.get_submodule(name)
        shape = _input_shape(nodes[0])
        if shape is None:
            continue
        shape = (batch, *shape[1:])
        in_roots = reads.get(name)
        in_fixed, in_counts = (_counts(in_roots, group_of) if in_roots is not None else
                               (shape[1] if isinstance(m, CONV) else shape[-1], ()))
        if name in graph.producer_ids:
            out_fixed, out_counts = _counts(graph.el.roots(graph.producer_ids[name]).tolist(), group_of)
        else:  # a depthwise conv writes what it reads
            out_fixed, out_counts = in_fixed, in_counts
        common = {"name": name, "in_shape": shape, "bias": getattr(m, "bias", None) is not None,
                  "in_fixed": in_fixed, "in_counts": in_counts, "out_fixed": out_fixed, "out_counts": out_counts,
                  "calls": len(nodes)}
        if isinstance(m, CONV):
            pad = m.padding if not isinstance(m.padding, str) else tuple(
                (d * (k - 1)) // 2 if m.padding == "same" else 0 for k, d in zip(m.kernel_size, m.dilation))
            dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
            act = _activation(nodes[0], graph.model, through_bn=True)
            whole = any(c.name == name and c.role == "groups" for c in graph.consumers)
            out.append(Site(op="conv", out_channels=m.out_channels, kernel=tuple(m.kernel_size),
                            stride=tuple(m.stride), padding=tuple(pad), dilation=tuple(m.dilation), groups=m.groups,
                            depthwise=dw, act=act if act in _UNFUSED else "",
                            group_width=m.in_channels // m.groups if whole else 0, **common))
        else:
            out.append(Site(op="linear", out_channels=m.out_features, act=_activation(nodes[0], graph.model),
                            **common))
    return out


# ----------------------------------------------------------------------------------------------------------
# one-layer models


def layer_model(site: Site, cin: int, cout: int) -> bytes:
    """A one-layer ONNX model of ``site`` at input width ``cin`` and output width ``cout``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = list(site.in_shape)
    inits = []
    if site.op == "conv":
        groups = cin if site.depthwise else (cin // site.group_width if site.group_width else site.groups)
        if site.tied:
            cout = cin
        shape[1] = cin
        w = rng.standard_normal((cout, cin // groups, *site.kernel), dtype=np.float32) * 0.05
        inits.append(numpy_helper.from_array(w, "w"))
        ins = ["x", "w"]
        if site.bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), "b"))
            ins.append("b")
        nodes = [helper.make_node("Conv", ins, ["c"], kernel_shape=list(site.kernel), strides=list(site.stride),
                                  pads=list(site.padding) * 2, dilations=list(site.dilation), group=groups)]
        # a ReLU (or ReLU6, or nothing) fuses into the conv's kernel: one Relu stands for all three
        nodes += _activation_nodes(site.act or "relu", "c", "y", inits)
        out_shape = None
    else:
        shape[-1] = cin
        w = rng.standard_normal((cin, cout), dtype=np.float32) * 0.05
        inits.append(numpy_helper.from_array(w, "w"))
        if site.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout, dtype=np.float32) * 0.05, "b"))
        lin = "l" if site.act else "y"
        if len(shape) == 2:
            nodes = [helper.make_node("Gemm", ["x", "w", "b"] if site.bias else ["x", "w"], [lin])]
        elif site.bias:  # the exporter writes a linear layer on a 3-D or 4-D input as MatMul, then Add
            nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], [lin])]
        else:
            nodes = [helper.make_node("MatMul", ["x", "w"], [lin])]
        nodes += _activation_nodes(site.act, lin, "y", inits)
        out_shape = None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "site", [x], [y], initializer=inits)
    # IR 10: onnx 1.23 stamps IR 14, which ONNX Runtime 1.31 rejects (docs/onnx-runtime.md §1)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model.SerializeToString()


def _activation_nodes(act: str, x: str, y: str, inits: list[Any]) -> list[Any]:
    """ONNX nodes computing ``y = act(x)`` as torch.onnx.export (opset 18) writes them (none for ``""``)."""
    from onnx import helper, numpy_helper

    if act == "relu":
        return [helper.make_node("Relu", [x], [y])]
    if act == "silu":
        return [helper.make_node("Sigmoid", [x], ["sig"]), helper.make_node("Mul", [x, "sig"], [y])]
    if act == "gelu":  # x * 0.5 * (1 + erf(x / sqrt(2)))
        inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                  for n, v in (("sqrt2", math.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
        return [helper.make_node("Div", [x, "sqrt2"], ["g0"]), helper.make_node("Erf", ["g0"], ["g1"]),
                helper.make_node("Add", ["g1", "one"], ["g2"]), helper.make_node("Mul", ["half", "g2"], ["g3"]),
                helper.make_node("Mul", [x, "g3"], [y])]
    return []


@dataclass
class Timer:
    """Times one-layer models on ONNX Runtime with the benchmark's session options."""

    provider: str
    threads: int | None = None
    repeats: int = _REPEATS
    _overhead: float | None = None

    def raw(self, model: bytes, shape: tuple[int, ...]) -> float:
        """A low percentile (25th) of ``repeats`` timed runs in ms: robust to other work on the machine."""
        from deploy_prune.bench import make_runner, make_session

        session = make_session(model, self.provider, self.threads)
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        run = make_runner(session, x, self.provider)
        for _ in range(_WARMUP):
            run()
        return _low_ms(run, self.repeats)

    def overhead(self) -> float:
        """The time of ``session.run`` on a trivial model: what every one-node timing pays on top of its op."""
        if self._overhead is None:
            site = Site("overhead", "linear", (1, 1), 1, bias=False)
            self._overhead = self.raw(layer_model(site, 1, 1), (1, 1))
        return self._overhead

    def site(self, site: Site, cin: int, cout: int) -> float:
        return max(0.0, self.raw(layer_model(site, cin, cout), _in_shape(site, cin)) - self.overhead())

    def widths(self, site: Site, cin: int, couts: Sequence[int], rounds: int) -> list[dict[int, float]]:
        """``site`` at each output width in ``couts``, timed side by side: every session is made and warmed
        first, then each round runs a block of ``repeats`` runs of each width in turn (the first two of a block
        dropped); per round and width, the block's 25th percentile in ms, less the per-call overhead. Widths
        timed one after another in their own sessions differ by whatever the machine did in between (on a
        2-vCPU VM one width came out slower than the next block's); side by side, rounds see the same machine."""
        from deploy_prune.bench import make_runner, make_session

        x = np.random.default_rng(0).standard_normal(_in_shape(site, cin), dtype=np.float32)
        runs = {w: make_runner(make_session(layer_model(site, cin, w), self.provider, self.threads), x,
                               self.provider) for w in couts}
        for run in runs.values():
            for _ in range(_WARMUP):
                run()
        overhead = self.overhead()
        out = []
        for _ in range(rounds):
            row = {}
            for w, run in runs.items():
                run()  # the first two runs after switching width refill the caches: not timed
                run()
                row[w] = max(0.0, _low_ms(run, self.repeats) - overhead)
            out.append(row)
        return out


def _low_ms(run: Callable[[], Any], n: int) -> float:
    """The 25th percentile in ms of ``n`` timed calls of ``run``: robust to other work on the machine."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        run()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.percentile(times, 25))


def _in_shape(site: Site, cin: int) -> tuple[int, ...]:
    shape = list(site.in_shape)
    if site.op == "conv":
        shape[1] = cin
    else:
        shape[-1] = cin
    return tuple(shape)


# ----------------------------------------------------------------------------------------------------------
# tables and the cache


def cache_dir() -> Path:
    env = os.environ.get("DEPLOY_PRUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deploy-prune"


def environment_key(provider: str, threads: int) -> dict[str, Any]:
    """What every measured table depends on besides the layer itself."""
    import onnxruntime

    from deploy_prune.bench import cpu_name

    return {"provider": provider, "threads": threads, "onnxruntime": onnxruntime.__version__, "cpu": cpu_name(),
            "table_version": TABLE_VERSION}


class TableCache:
    """Measured one-layer timings on disk: ``{site config: {"cin,cout": ms}}`` per environment file."""

    def __init__(self, env: Mapping[str, Any], directory: Path | None = None) -> None:
        self.env = dict(env)
        digest = hashlib.sha256(json.dumps(self.env, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (directory or cache_dir()) / f"latency-{digest}.json"
        self.tables: dict[str, dict[str, float]] = {}
        self.hits = self.misses = 0
        try:
            data = json.loads(self.path.read_text())
            if data.get("env") == self.env:
                self.tables = {k: dict(v) for k, v in data.get("tables", {}).items()}
        except (OSError, ValueError, AttributeError):
            pass

    def get(self, config: str, cin: int, cout: int) -> float | None:
        v = self.tables.get(config, {}).get(f"{cin},{cout}")
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, config: str, cin: int, cout: int, ms: float) -> None:
        self.tables.setdefault(config, {})[f"{cin},{cout}"] = ms

    def save(self) -> None:
        """Merge with what another run may have written meanwhile, then replace the file atomically."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {}
            try:
                old = json.loads(self.path.read_text())
                if old.get("env") == self.env:
                    merged = {k: dict(v) for k, v in old.get("tables", {}).items()}
            except (OSError, ValueError, AttributeError):
                pass
            for k, v in self.tables.items():
                merged.setdefault(k, {}).update(v)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"env": self.env, "tables": merged}, f)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home is no reason to fail a run: the tables are just not kept
            pass


def _round_width(w: float, step: int, align: int, full: int) -> int:
    unit = math.lcm(max(1, step), max(1, align))
    v = int(round(w / unit)) * unit
    return min(full, max(unit if full >= unit else full, v))


@dataclass
class Table:
    """Measured ms at a grid of (input width, output width), interpolated bilinearly."""

    cins: list[int]
    couts: list[int]
    ms: np.ndarray  # [len(cins), len(couts)]

    def __call__(self, cin: float, cout: float) -> float:
        return float(_interp2(self.cins, self.couts, self.ms, cin, cout))


def _interp1(xs: list[int], x: float) -> tuple[int, int, float]:
    """Indices (i, j) and weight t of x between xs[i] and xs[j] (linear extrapolation at both ends)."""
    if len(xs) == 1:
        return 0, 0, 0.0
    k = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    i, j = k - 1, k
    return i, j, (x - xs[i]) / (xs[j] - xs[i])


def _interp2(xs: list[int], ys: list[int], z: np.ndarray, x: float, y: float) -> float:
    i, j, t = _interp1(xs, x)
    k, m, u = _interp1(ys, y)
    top = z[i, k] * (1 - u) + z[i, m] * u
    bottom = z[j, k] * (1 - u) + z[j, m] * u
    return max(0.0, float(top * (1 - t) + bottom * t))


@dataclass
class LatencyModel:
    """Predicted latency (ms) of the model as a function of each group's kept fraction."""

    sites: list[Site]
    tables: dict[str, Table]
    step: int
    measured: int = 0  # one-layer timings measured for this model (the rest came from the cache)
    reused: int = 0
    by_group: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.sites):
            for g in s.groups_touched():
                self.by_group.setdefault(g, []).append(i)

    def site_ms(self, i: int, frac: Mapping[int, float]) -> float:
        s = self.sites[i]
        cin, cout = s.widths(frac)
        return self.tables[s.name](cin, cout) * s.calls

    def predict(self, frac: Mapping[int, float]) -> float:
        return sum(self.site_ms(i, frac) for i in range(len(self.sites)))

    def macs(self, frac: Mapping[int, float]) -> float:
        """Multiply-accumulates of the model's conv and linear calls at the kept fractions ``frac``."""
        return sum(s.macs_at(frac) for s in self.sites)

    def delta(self, frac: Mapping[int, float], group: int, new: float) -> float:
        """Predicted ms saved when ``group`` goes from its fraction in ``frac`` to ``new``."""
        changed = {**frac, group: new}
        return sum(self.site_ms(i, frac) - self.site_ms(i, changed) for i in self.by_group.get(group, ()))


def _grid(site: Site, step: int, fractions: Sequence[float] = _GRID_FRACTIONS) -> tuple[list[int], list[int]]:
    full_in, full_out = site.widths({})
    cins, couts = set(), set()
    for f in fractions:
        frac = {g: f for g in site.groups_touched()}
        cin, cout = site.widths(frac)
        cins.add(_round_width(cin, step, site.align(), int(full_in)))
        couts.add(_round_width(cout, step, site.align(), int(full_out)))
    if site.tied:
        couts = set(cins)
    return sorted(cins), sorted(couts)


def build(graph: DependencyGraph, batch: int, timer: Timer, cache: TableCache, step: int,
          progress: Callable[[int, int], None] | None = None,
          fractions: Sequence[float] = _GRID_FRACTIONS) -> LatencyModel:
    """Measure (or read from the cache) every site's table at ``fractions`` of its widths (rounded to the
    ``step``); returns the latency model."""
    all_sites = sites(graph, batch)
    todo = []
    grids = {}
    for s in all_sites:
        cins, couts = _grid(s, step, fractions)
        grids[s.name] = (cins, couts)
        pairs = [(c, c) for c in cins] if s.tied else [(a, b) for a in cins for b in couts]
        todo += [(s, a, b) for a, b in pairs]
    measured = reused = 0
    values: dict[tuple[str, int, int], float] = {}
    for n, (s, a, b) in enumerate(todo):
        v = cache.get(s.config(), a, b)
        if v is None:
            v = timer.site(s, a, b)
            cache.put(s.config(), a, b, v)
            measured += 1
        else:
            reused += 1
        values[(s.name, a, b)] = v
        if progress is not None:
            progress(n + 1, len(todo))
    cache.save()
    tables = {}
    for s in all_sites:
        cins, couts = grids[s.name]
        if s.tied:
            z = np.array([[values[(s.name, a, a)] for _ in [0]] for a in cins])
            tables[s.name] = _DepthwiseTable(cins, [cins[-1]], z)
        else:
            z = np.array([[values[(s.name, a, b)] for b in couts] for a in cins])
            tables[s.name] = Table(cins, couts, z)
    return LatencyModel(all_sites, tables, step, measured, reused)


class _DepthwiseTable(Table):
    """A depthwise conv's time, or that of a conv losing whole groups, depends on one width."""

    def __call__(self, cin: float, cout: float) -> float:
        i, j, t = _interp1(self.cins, cin)
        return max(0.0, float(self.ms[i, 0] * (1 - t) + self.ms[j, 0] * t))


# ----------------------------------------------------------------------------------------------------------
# --round-to auto


AUTO_STEPS = (8, 16, 32)
_AUTO_BASE = 64
AUTO_REPEATS = 10  # timed runs per block in choose_step: short blocks, many rounds (the tables use _REPEATS)
AUTO_MARGIN = 0.8  # a coarser block must fit the timings this much better (misfit ratio) to be chosen
AUTO_MAX_MISFIT = 0.1  # ... and explain at least 90% of the variance of the width profile
AUTO_MIN_MS = 0.3  # a layer faster than this is too close to per-call overhead to show the kernel's blocking


def choose_step(latency_sites: list[Site], timer: Timer, *, top: int = 3, rounds: int = 15
                ) -> tuple[int, dict[str, Any]]:
    """The channel step that pays on this provider: the channel block its kernels pad output widths to.

    On the ``top`` most expensive plain convs with at least 128 outputs (by their dense one-layer time), the
    output width is set to every multiple of 8 from 72 to 128, and the times are fitted, for each candidate
    block B in 8, 16, 32, by ``a + b * ceil(width / B) * B`` (least squares): a kernel that pads widths to its
    block of 16 runs 72 and 80 channels in the same time, 88 and 96 in the same time, and so on, which the
    B = 16 staircase fits and a straight line (B = 8) or the coarser staircase does not. Starting from 8, a
    coarser B is taken only where its misfit (1 - R²) is below :data:`AUTO_MARGIN` times the current one's and
    at most :data:`AUTO_MAX_MISFIT`: where the timings are too noisy to show a staircase, the step stays 8,
    the finest one, which never makes a target unreachable. Stopping at a width between two blocks would buy
    nothing but lost channels. The layers' votes are reduced to their median. A small base width makes one
    block a large share of the work, so the staircase stands out of timing noise.

    The widths are timed side by side (:meth:`Timer.widths`: all sessions made and warmed first, then
    ``rounds`` rounds of one block of runs per width); each round is divided by its own mean, so that a slow
    spell of the machine scales a round instead of bending it, and the fit is made to each width's median
    over the rounds. Earlier versions compared two widths per step (64 + s against 64 + 2s, 4% or half the
    ideal saving): on this project's 2-vCPU Intel Xeon (AVX-512, block 16) they chose 8 or 32 in 2 to 4 of 10
    calls, from one noisy pair; docs/latency-target.md has the fit's record. The CLI times blocks of
    :data:`AUTO_REPEATS` runs (``Measure.timer(repeats=...)``).

    A layer that runs in under :data:`AUTO_MIN_MS` is mostly per-call overhead, and a 5% difference in its time
    is noise (``builtin:mnist_cnn``'s 7x7 conv, 0.065 ms: once 16, once 32, on the same machine). The block
    is the kernel's, not the layer's, so when no layer of the model is slow enough a reference conv (3x3, 64
    channels in, 56x56, the first stage of a ResNet) is timed in its place.
    """
    convs = [s for s in latency_sites if s.op == "conv" and not s.depthwise and s.groups == 1
             and s.out_channels >= 2 * _AUTO_BASE]
    dense_ms = {s.name: timer.site(s, s.in_channels, s.out_channels) for s in convs}
    slow = [s for s in sorted(convs, key=lambda s: -dense_ms[s.name]) if dense_ms[s.name] >= AUTO_MIN_MS][:top]
    note = None
    if not slow:
        batch = latency_sites[0].in_shape[0] if latency_sites else 1
        slow = [Site("reference conv 3x3 64x56x56", "conv", (batch, 64, 56, 56), 2 * _AUTO_BASE, kernel=(3, 3),
                     stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=False)]
        note = (f"no plain conv with 128 or more outputs takes {AUTO_MIN_MS} ms or more in this model; timed a "
                "reference conv instead (the channel block is the kernel's)")
    votes: list[int] = []
    rows = []
    widths = list(range(_AUTO_BASE + AUTO_STEPS[0], 2 * _AUTO_BASE + 1, AUTO_STEPS[0]))
    for s in slow:
        timed = timer.widths(s, s.in_channels, widths, rounds)
        scaled = [{w: r[w] / (statistics.fmean(r.values()) or 1.0) for w in widths} for r in timed]
        profile = [statistics.median(r[w] for r in scaled) for w in widths]
        misfit = {b: _staircase_misfit(widths, profile, b) for b in AUTO_STEPS}
        chosen = AUTO_STEPS[0]
        for b in AUTO_STEPS[1:]:  # a coarser block only where it fits clearly better: noise keeps the fine step
            if misfit[b] < AUTO_MARGIN * misfit[chosen] and misfit[b] <= AUTO_MAX_MISFIT:
                chosen = b
        rows.append({"layer": s.name, "step": chosen,
                     "ms": {str(w): round(statistics.median(r[w] for r in timed), 4) for w in widths},
                     "misfit": {str(b): round(v, 4) for b, v in misfit.items()}})
        votes.append(chosen)
    step = sorted(votes)[len(votes) // 2]
    info: dict[str, Any] = {"layers": rows, "base": _AUTO_BASE, "rounds": rounds,
                            "margin": AUTO_MARGIN, "max_misfit": AUTO_MAX_MISFIT,
                            "method": "least-squares fit of time = a + b * ceil(width / B) * B for each B; a "
                                      "coarser B where its misfit is below margin x the finer one's and max_misfit"}
    if note:
        info["reason"] = note
    return step, info


def _staircase_misfit(widths: Sequence[int], ys: Sequence[float], block: int) -> float:
    """1 - R² of the least-squares fit ``y = a + b * ceil(width / block) * block``: 0 for a perfect fit."""
    x = np.array([math.ceil(w / block) * block for w in widths], dtype=float)
    y = np.array(ys, dtype=float)
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0.0:
        return 0.0
    a = np.vstack([np.ones_like(x), x]).T
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(((y - a @ coef) ** 2).sum()) / total
