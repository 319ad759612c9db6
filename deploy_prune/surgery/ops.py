"""What the dependency analysis knows about PyTorch ops: which pass channels through, which combine them, which
only move data, and small helpers on label tensors (see graph.py for how labels work)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.Identity, nn.PReLU)
SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                    nn.ReplicationPad2d, nn.ReplicationPad3d)  # padding modules pad the trailing (spatial) dims
RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu6, F.relu_}

PASS_FUNCS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
    torch.sigmoid, F.tanh, torch.tanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, operator.neg, torch.neg, torch.abs, torch.exp,
    torch.sqrt, torch.rsqrt, torch.erf,
}
try:  # torchvision wraps these for torch.fx; both act per sample or per element, never across channels
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    PASS_FUNCS.add(_tv_stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "neg", "abs",
    "exp", "sqrt", "float", "half", "double", "to", "type_as", "clone", "detach", "contiguous", "requires_grad_",
    "hardswish", "hardswish_", "erf",
}
SPATIAL_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate, F.upsample, F.pad}
BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                 operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                 torch.maximum, torch.minimum, torch.max, torch.min}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
MOVE_FUNCS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.split, torch.chunk,
               torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
               operator.getitem, torch.narrow, torch.unbind, torch.roll, torch.flip, torch.movedim,
               torch.swapaxes, getattr, torch.tensor_split}
MOVE_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "expand",
                 "expand_as", "chunk", "split", "unbind", "narrow", "size", "dim", "flip", "roll", "movedim",
                 "swapaxes", "unflatten", "tensor_split", "__getitem__", "numel"}
RESHAPES = {"view", "reshape", torch.reshape}
SLICING = {"split", "chunk", "tensor_split", "unbind", "narrow", "getitem", "__getitem__"}
REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
SOFTMAX_FUNCS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
POW_FUNCS = {operator.pow, torch.pow}  # by a scalar: element-wise (StarReLU's relu(x) ** 2)


def varying_dims(t: torch.Tensor) -> list[int]:
    return [d for d in range(t.dim()) if t.shape[d] > 1 and bool((t != t.narrow(d, 0, 1)).any())]


def vector(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The 1-D labels along ``dim`` of a label tensor that is constant along every other dim."""
    idx = [0] * t.dim()
    idx[dim] = slice(None)
    return t[tuple(idx)].reshape(-1)


def along(vec: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return vec.view(view).expand(shape).contiguous()


def tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    fx.node.map_aggregate(obj, lambda v: out.append(v) if isinstance(v, torch.Tensor) else None)
    return out


def meta_shapes(node: fx.Node) -> Any:
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


def tracks_labels(n: fx.Node) -> bool:
    """Whether node ``n`` is an op whose channel semantics the propagator understands."""
    if n.op == "call_function":
        t = n.target
        return (t in BINARY_FUNCS or t in MOVE_FUNCS or t in PASS_FUNCS or t in SPATIAL_FUNCS or t in REDUCE_FUNCS
                or t in SOFTMAX_FUNCS or t in POW_FUNCS)
    if n.op == "call_method":
        t = n.target
        return (t in BINARY_METHODS or t in MOVE_METHODS or t in PASS_METHODS or t in REDUCE_METHODS
                or t in ("softmax", "log_softmax", "pow", "pow_"))
    return n.op in ("call_module", "output")

