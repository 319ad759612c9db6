"""What a model returns: one tensor, or several named ones.

deploy-prune handles a forward() that returns

* a tensor (a classifier's logits): one output, named ``logits`` in the ONNX file;
* a dict (``OrderedDict`` included) of tensors, e.g. torchvision's segmentation models (``{"out", "aux"}``) or a
  detector's backbone + FPN (``{"0", "1", "2", "3", "pool"}``): one output per key, named after the key, in
  the dict's order;
* a tuple or list of tensors: one output per item, named ``output_0``, ``output_1``... (a namedtuple's items
  are named after its fields).

Anything else (``None`` among the items, nested containers, a list of dicts as torchvision's detectors return,
non-tensor values) is refused with a :class:`~deploy_prune.errors.BadInput` that says what was found.
Every output's channel width is protected by the surgery (each reaches the graph's ``output`` node); parity
compares every output; the benchmark times the whole call; the report lists each output's name and shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from deploy_prune.errors import BadInput

__all__ = ["LOGITS", "named_outputs", "output_names", "output_shapes", "describe"]

#: The name of a single-tensor output (a classifier's logits).
LOGITS = "logits"
_INPUT = "input"  # the exported file's input name: no output may take it
_SAFE = re.compile(r"[^A-Za-z0-9_.:/-]")


def describe(out: Any) -> str:
    """A short description of an output structure for error messages (``dict{'out': Tensor, ...}``)."""
    if isinstance(out, torch.Tensor):
        return "Tensor"
    if isinstance(out, Mapping):
        items = list(out.items())[:3]
        inner = ", ".join(f"{k!r}: {describe(v)}" for k, v in items)
        return f"{type(out).__name__}{{{inner}{', ...' if len(out) > 3 else ''}}}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(describe(v) for v in list(out)[:3])
        return f"{type(out).__name__}[{inner}{', ...' if len(out) > 3 else ''}]"
    return type(out).__name__


def _refuse(out: Any, why: str) -> BadInput:
    return BadInput(f"the model returns {describe(out)}, {why}; deploy-prune handles a tensor or a dict, tuple or "
                    "list of tensors: wrap the model so that forward() returns one of those")


def _clean(name: str) -> str:
    name = _SAFE.sub("_", name) or "output"
    return f"{name}_output" if name == _INPUT else name


def named_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """The model output ``out`` as ``(name, tensor)`` pairs in the order the ONNX exporter flattens them.

    Raises:
        BadInput: ``out`` is not a tensor nor a flat dict/tuple/list of tensors.
    """
    if isinstance(out, torch.Tensor):
        return [(LOGITS, out)]
    if isinstance(out, Mapping):
        if not out:
            raise _refuse(out, "an empty dict")
        pairs = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        if not out:
            raise _refuse(out, f"an empty {type(out).__name__}")
        fields = getattr(out, "_fields", None)
        pairs = [(str(fields[i]) if fields else f"output_{i}", v) for i, v in enumerate(out)]
    else:
        raise _refuse(out, "which is not a tensor")
    bad = [(k, v) for k, v in pairs if not isinstance(v, torch.Tensor)]
    if bad:
        k, v = bad[0]
        raise _refuse(out, f"whose item {k!r} is a {describe(v)}, not a tensor")
    names: list[str] = []
    for k, _ in pairs:
        n = base = _clean(k)
        i = 1
        while n in names:
            n, i = f"{base}_{i}", i + 1
        names.append(n)
    return [(n, v) for n, (_, v) in zip(names, pairs)]


def output_names(out: Any) -> list[str]:
    """The ONNX output names for the model output ``out`` (see :func:`named_outputs`)."""
    return [n for n, _ in named_outputs(out)]


def output_shapes(out: Any) -> list[dict[str, Any]]:
    """``[{"name": ..., "shape": [...]}]`` for the model output ``out``: what the report lists."""
    return [{"name": n, "shape": list(t.shape)} for n, t in named_outputs(out)]
