"""Parity for a model whose output is identically zero: compare the classifier's *input* instead.

torchvision zero-initialises some classifiers (ViT's ``heads.head``), so a random-init ViT outputs exactly 0
for every input. Comparing 0 with 0 proves nothing about the exported graph, and calling that a disagreement
would be wrong too. The classifier is the last layer, a plain ``Gemm``/``MatMul`` (+ bias ``Add``) or ``Conv``
in the file; everything that can go wrong in an export happens before it. So this module finds

* in PyTorch, the leaf module whose output *is* the model's output (a forward hook records its input), and
* in the ONNX file, the tensor that feeds the node producing the output (walking back over a bias ``Add``),

adds that tensor as an extra graph output in a temporary copy of the file (the original is never changed;
external weights are shared, not copied), runs both on the same inputs and compares them with the same
tolerances as the output. When either side cannot be found, :class:`ProbeUnavailable` says why, and the caller
turns that into a one-line error that asks for trained weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

_HEAD_OPS = ("Gemm", "MatMul", "Conv")
_PASS_THROUGH = ("Identity",)


class ProbeUnavailable(Exception):
    """The classifier's input cannot be compared; ``str()`` says why (one clause, no trailing period)."""


def _head_calls(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module, list[Any], Any]:
    """Run ``model(x)`` and return the leaf module whose output is the model's output, with its inputs."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, tuple[Any, ...], Any]] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        calls.append((mod, args, out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    for mod, args, got in reversed(calls):
        if got is out:
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ProbeUnavailable(f"the output comes straight from a {type(mod).__name__} "
                                       f"('{names.get(mod, '?')}'), not a linear or conv classifier")
            if not args or not isinstance(args[0], torch.Tensor):
                raise ProbeUnavailable(f"the classifier '{names.get(mod, '?')}' takes no tensor input")
            return names.get(mod, "?"), mod, list(args), out
    raise ProbeUnavailable("the output is computed after the last layer (no linear or conv layer produces it "
                           "directly)")


def _onnx_head_input(model: Any, output_name: str) -> str:
    """The name of the tensor that feeds the classifier node producing ``output_name``."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    name = output_name
    for _ in range(4):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in _HEAD_OPS:
            if node.input[0] in constants:
                break
            return str(node.input[0])
        if node.op_type == "Add" and len(node.input) == 2 and sum(i in constants for i in node.input) == 1:
            name = next(i for i in node.input if i not in constants)  # the bias: step over it
            continue
        if node.op_type in _PASS_THROUGH:
            name = node.input[0]
            continue
        raise ProbeUnavailable(f"the ONNX output is produced by a {node.op_type} node, not the classifier")
    raise ProbeUnavailable("the ONNX graph's classifier node was not found")


def compare_head_input(onnx_path: Path, model: nn.Module, inputs: Sequence[torch.Tensor], *, provider: str,
                       rtol: float, atol_factor: float) -> dict[str, Any]:
    """Compare the input of the classifier in ``onnx_path`` with PyTorch's, on ``inputs``.

    ``model`` must already be in eval mode on its device (the caller holds ``no_grad`` and TF32 off).

    Returns:
        ``{"layer", "tensor", "max_abs_diff", "max_rel_diff", "ref_max_abs", "ok"}``.

    Raises:
        ProbeUnavailable: the classifier or its ONNX input cannot be identified, or its input is zero too.
    """
    import onnx

    from deploy_prune.bench import make_session

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    if len(proto.graph.output) != 1:
        raise ProbeUnavailable(f"the file has {len(proto.graph.output)} outputs")
    tensor = _onnx_head_input(proto, proto.graph.output[0].name)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    # In the original's folder, so that the relative external-data location of a large model resolves to the
    # same sidecar (ONNX Runtime refuses a location outside the model's folder, symlinks resolved); removed
    # right after.
    fd, name = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=onnx_path.parent)
    os.close(fd)
    probe = Path(name)
    try:
        onnx.save_model(proto, str(probe))
        session = make_session(probe, provider, threads=None, cuda_options={"use_tf32": "0"})
        feed = session.get_inputs()[0].name
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        layer = ""
        max_abs = ref_max = 0.0
        ok = True
        for x in inputs:
            layer, _, args, _ = _head_calls(model, x.to(device))
            ref = args[0].detach().cpu().double().numpy()
            got = np.asarray(session.run([tensor], {feed: x.detach().cpu().numpy().astype(np.float32)})[0],
                             dtype=np.float64)
            if got.shape != ref.shape:
                raise ProbeUnavailable(f"the ONNX tensor {tensor!r} has shape {got.shape}, the input of "
                                       f"'{layer}' {ref.shape}")
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            ok &= bool(np.allclose(got, ref, rtol=rtol, atol=atol_factor * scale))
            max_abs = max(max_abs, float(np.max(np.abs(got - ref))) if ref.size else 0.0)
            ref_max = max(ref_max, scale)
    finally:
        probe.unlink(missing_ok=True)
    if ref_max == 0.0:
        raise ProbeUnavailable(f"the input of the classifier '{layer}' is identically zero as well")
    return {"layer": layer, "tensor": tensor, "max_abs_diff": max_abs, "max_rel_diff": max_abs / ref_max,
            "ref_max_abs": ref_max, "ok": bool(ok)}
