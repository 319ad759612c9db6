"""Export a PyTorch model to one self-contained ONNX file, tidy the graph, and check parity with ONNX Runtime.

The three stages mirror what a deployment engineer does by hand (``docs/onnx-runtime.md`` §1-2, §8):

* :func:`export_onnx` runs the dynamo exporter (the default since torch 2.9) with a dynamic batch dimension
  and the fixed I/O names ``input`` / ``logits``. Weights are stored inside the file unless they exceed
  protobuf's 2 GiB limit (RegNet-Y-128GF, ViT-H/14): then they go to one ``<file>.onnx.data`` sidecar, which
  must travel with the file.
  The exporter's own optimizer already folds BatchNorm into Conv.
* :func:`cleanup_onnx` is a *tidiness* pass with onnx-graphsurgeon (constant folding, Identity removal, dead
  code removal). ORT's own optimizer does all of that at load time, so it does not make anything faster; the
  report shows its node counts, never a speedup.
* :func:`parity` compares ONNX Runtime with PyTorch on the same inputs, with a tolerance scaled to the output's
  magnitude so near-zero outputs cannot pass trivially.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import io
import logging
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deploy_prune.errors import BadInput, DeployPruneError, opt
from deploy_prune.outputs import named_outputs

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "export_onnx", "check_onnx", "cleanup_onnx", "parity"]

logger = logging.getLogger(__name__)

#: The name of the model input in every exported file.
INPUT_NAME = "input"
#: The name of the model output in every exported file.
OUTPUT_NAME = "logits"

# Parity tolerances (docs/onnx-runtime.md §1: the PyTorch/ORT tutorial uses rtol 1e-3; fp32 CPU diffs are ~1e-7).
_RTOL = 1e-3
_ATOL_FACTOR = 1e-4
# Below this output magnitude an absolute tolerance proves nothing (docs/onnx-runtime.md §8).
_TINY_OUTPUT = 1e-6
# Folding constants bigger than this would bloat the file (polygraphy's default threshold is 16 MiB too).
_FOLD_SIZE_THRESHOLD = 16 * 2**20
_MAX_CLEANUP_PASSES = 5
#: Weights above this many bytes cannot live inside one protobuf (2 GiB hard limit, less the graph itself).
INLINE_LIMIT = 1_800_000_000


def sidecar_of(path: Path) -> Path:
    """The external-data file that belongs to ``path`` (``model.onnx`` -> ``model.onnx.data``)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def onnx_size(path: Path) -> int:
    """Bytes of an ONNX model on disk: the file plus its external-data sidecar, if it has one."""
    side = sidecar_of(path)
    return Path(path).stat().st_size + (side.stat().st_size if side.exists() else 0)


def _weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """Capture Python-level stdout, stderr and warnings into one buffer.

    The dynamo exporter prints four progress lines per stage and may warn about decompositions; a library
    should not, so everything goes into the buffer, which callers attach to the error if export fails.
    """
    buf = io.StringIO()
    with (
        contextlib.redirect_stdout(buf),
        contextlib.redirect_stderr(buf),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        try:
            yield buf
        finally:
            for w in caught:
                buf.write(f"{w.category.__name__}: {w.message}\n")


def _dynamic_batch(model: nn.Module) -> dict[str, Any]:
    """``dynamic_shapes`` marking dim 0 of forward()'s first argument as ``batch``.

    ``dynamic_shapes`` is keyed by forward()'s argument names, not by ``input_names`` (docs/onnx-runtime.md §1).
    ``inspect.signature`` also works on fx GraphModules, whose generated forward names its placeholders.
    A ``forward(*xs)`` receives the example as a one-element tuple, so its spec is a one-element tuple too.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    if not params or params[0].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD):
        raise DeployPruneError(f"{type(model).__name__}.forward() takes no positional input; cannot export it")
    first = params[0]
    batch = {0: "batch"}
    return {first.name: (batch,) if first.kind == inspect.Parameter.VAR_POSITIONAL else batch}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_REASON = 300


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (ANSI colors removed), prefixed with its type."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _export_reason(exc: BaseException) -> str:
    """One line saying which exporter stage failed and the root cause.

    The exporter wraps the real error in a long "This is step 1/3 ... Next steps:" message; the useful parts
    are its first sentence and the innermost exception of the ``__cause__`` chain (e.g.
    ``GuardOnDataDependentSymNode`` or ``NotImplementedError: aten_histc ...``).
    """
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    first = _ANSI.sub("", str(exc)).strip().split("This is step")[0].strip().splitlines()
    stage = first[0].strip().rstrip(".") if first else type(exc).__name__
    if root is exc:
        return _one_line(exc)
    return f"{stage} ({_one_line(root)})"


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, *, opset: int = 18,
                external_data: bool | None = None) -> None:
    """Export ``model`` to an ONNX file with a dynamic batch dimension.

    The model is exported in eval mode, on CPU, without gradients; its original device and train/eval mode
    are restored afterwards. The file has one input ``input`` (dim 0 named ``batch``) and one output
    ``logits`` for a model that returns a tensor, or one output per key of a returned dict (per item of a
    tuple/list: ``output_0``, ...; see :mod:`deploy_prune.outputs`). Weights are stored inline unless they exceed :data:`INLINE_LIMIT` bytes; then they go to
    one sidecar, :func:`sidecar_of` ``(path)``.

    Args:
        model: the model to export. ``torch.nn.utils.prune`` reparametrizations must already be removed
            (``prune.remove``), otherwise the file would compute ``weight_orig * weight_mask`` at run time.
        path: the ``.onnx`` file to write; parent folders are created.
        example: an example input (its batch size does not matter; the batch dimension is exported as dynamic).
        opset: the ONNX opset. torch's minimum is 18; lower values come out as 18 anyway (docs/onnx-runtime.md §1).
        external_data: ask for (True) or against (False) the sidecar; None decides by the weights' size. The
            exporter may still write one for a model near the limit; it is then kept.

    Raises:
        DeployPruneError: the model still carries pruning reparametrizations, or the exporter failed. The
            message is one line; the exporter's captured output is attached as a note (``__notes__``) and as
            the ``log`` attribute.
    """
    path = Path(path)
    leftover = [n for n, _ in model.named_parameters() if n.endswith("_orig")]
    if leftover:
        raise DeployPruneError(
            f"model still has pruning reparametrizations ({', '.join(leftover[:3])}"
            f"{', ...' if len(leftover) > 3 else ''}): call torch.nn.utils.prune.remove(module, name) before export"
        )

    dynamic_shapes = _dynamic_batch(model)
    # torch.export specializes a dimension whose example value is 0 or 1, even when marked dynamic: ViT's
    # ``class_token.expand(n, -1, -1)`` then bakes batch 1 into the graph, ORT's MatMul->Gemm fusion adds a
    # Reshape to the static shape, and batch 2 fails at run time. Tracing with batch 2 keeps the dim symbolic.
    if example.shape[0] < 2:
        example = example[:1].expand(2, *example.shape[1:]).contiguous()

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    path.parent.mkdir(parents=True, exist_ok=True)
    # A sidecar beside the file we overwrite can only be that file's old external data: it would be stale.
    sidecar = sidecar_of(path)
    sidecar.unlink(missing_ok=True)
    if external_data is None:
        external_data = _weight_bytes(model) > INLINE_LIMIT
    model.eval().cpu()
    log = io.StringIO()
    try:
        with torch.no_grad():
            names = [n for n, _ in named_outputs(model(example.detach().cpu()))]
    except DeployPruneError:
        model.to(device)
        model.train(was_training)
        raise
    try:
        with _captured_output() as log, torch.no_grad():
            torch.onnx.export(
                model,
                (example.detach().cpu(),),
                str(path),
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                external_data=external_data,
                dynamo=True,
            )
    except Exception as exc:  # the exporter raises many unrelated types; all mean "could not export"
        err = DeployPruneError(f"ONNX export of {type(model).__name__} failed: {_export_reason(exc)}")
        err.log = log.getvalue()  # type: ignore[attr-defined]
        err.add_note("exporter output:\n" + log.getvalue()[-8000:])
        raise err from exc
    finally:
        model.to(device)
        model.train(was_training)
    logger.debug("exporter output for %s:\n%s", path, log.getvalue())

    # The exporter may still move weights out (its own size estimate counts more than the parameters, e.g.
    # ViT-H/14 pruned to 1.6 GB): the file is valid with its sidecar, which cleanup and the bundle keep.
    try:
        _check_dynamic_batch(path)
    except DeployPruneError:
        path.unlink(missing_ok=True)  # a file that only runs at one batch size is not what was asked for
        sidecar.unlink(missing_ok=True)
        raise


def _check_dynamic_batch(path: Path) -> None:
    """Raise if the exported file fixed the batch dimension of its input or output to a number."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise DeployPruneError(
                f"the exported graph fixed the batch dimension of {value.name!r} to {dims[0].dim_value}: "
                "the model's forward() makes the batch size static (e.g. a view with a hard-coded batch); "
                "make it use x.shape[0] instead"
            )


def check_onnx(path: Path) -> None:
    """Run the full ONNX checker and strict shape inference on a file.

    Args:
        path: the ``.onnx`` file. It is passed by path so that external data (if any) is found too.

    Raises:
        DeployPruneError: the model is invalid or its shapes cannot be inferred.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        if _has_external_data(onnx.load(str(path), load_external_data=False)):
            # in-memory inference needs the whole model in one protobuf; the path-based one has no 2 GiB limit
            with tempfile.TemporaryDirectory() as tmp:
                onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"),
                                                       check_type=True, strict_mode=True)
        else:
            onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as exc:  # ValidationError, InferenceError, DecodeError, OSError
        raise DeployPruneError(f"{path} is not a valid ONNX model: {_one_line(exc)}") from exc


# ----------------------------------------------------------------------------------------------------------
# cleanup


def _op_counts(model: Any) -> dict[str, int]:
    """Count the top-level nodes of an ``onnx.ModelProto`` by op type (custom domains as ``domain::Op``)."""
    counts = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node
    )
    return dict(sorted(counts.items()))


def _remove_identities(graph: Any) -> int:
    """Bypass every top-level Identity node of a graphsurgeon graph; returns how many were bypassed.

    Consumers are rewired from the Identity's output to its input. An Identity that *produces a graph
    output* is bypassed by letting its input tensor take over the output's name (so the file keeps its
    ``logits`` output), unless that input is itself a graph input, a graph output or a constant: then the
    Identity is the only way to express the output and it stays.
    """
    import onnx_graphsurgeon as gs

    removed = 0
    for node in [n for n in graph.nodes if n.op == "Identity" and n.domain in (None, "", "ai.onnx")]:
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        inp, out = node.inputs[0], node.outputs[0]
        out_index = next((i for i, t in enumerate(graph.outputs) if t is out), None)
        if out_index is not None:
            if (
                isinstance(inp, gs.Constant)
                or any(t is inp for t in graph.inputs)
                or any(t is inp for t in graph.outputs)
            ):
                continue
            name = out.name
            out.name = f"{name}__identity_bypassed"  # the orphan goes away in cleanup(); avoid a duplicate name
            inp.name = name
            inp.dtype = inp.dtype if inp.dtype is not None else out.dtype
            inp.shape = inp.shape if inp.shape is not None else out.shape
            graph.outputs[out_index] = inp
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = inp
        node.outputs.clear()
        node.inputs.clear()
        removed += 1
    return removed


def _protect_padded_maxpools(graph: Any) -> int:
    """Keep ONNX Runtime from fusing a zero ``Pad`` into the ``MaxPool`` after it; returns the MaxPools changed.

    ONNX Runtime's level-1 ``PadFusion`` (on by default, every provider) folds a constant ``Pad`` whose value is 0
    into the pads of a following Conv, AveragePool or MaxPool. For MaxPool that is wrong: MaxPool's own padding
    is ignored by the max (it acts as -inf), so a window whose real values are all negative gives 0 before the
    fusion and a negative number after it. Measured with ONNX Runtime 1.31.1: ``ConstantPad2d(1, 0)`` then
    ``MaxPool2d(3, 2)`` after a conv is 10% off PyTorch with the default optimizations and exact with them off;
    timm's BiT ResNetV2 stem is this pattern (2.4e-2 of the output's magnitude on ``resnetv2_50x1_bit``). The
    fusion skips a pool whose ``auto_pad`` is not ``NOTSET``, so the MaxPool's ``pads`` become
    ``auto_pad=VALID`` (no padding, the same output size; dropping the attribute alone does not stop ORT 1.31).
    A MaxPool that pads by itself gets that padding as a ``Pad`` with value -inf in front of it instead, which
    computes the same and is not fused either.
    """
    import onnx_graphsurgeon as gs

    changed = 0
    for node in [n for n in graph.nodes if n.op == "MaxPool" and n.domain in (None, "", "ai.onnx")]:
        if "pads" not in node.attrs or len(node.outputs) != 1 or not node.inputs:
            continue
        producers = node.inputs[0].inputs
        pad = producers[0] if len(producers) == 1 else None
        if pad is None or pad.op != "Pad" or pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
            continue
        value = pad.inputs[2] if len(pad.inputs) > 2 else None
        if isinstance(value, gs.Constant) and np.any(value.values != 0):
            continue  # a non-zero pad value is never fused
        pads = [int(p) for p in node.attrs["pads"]]
        if any(pads):
            rank = len(pads) // 2 + 2
            full = np.zeros(2 * rank, dtype=np.int64)
            full[2:rank], full[rank + 2:] = pads[:rank - 2], pads[rank - 2:]
            src = node.inputs[0]
            name = f"{node.name or 'maxpool'}__neg_inf_pad{changed}"  # unique even for unnamed pools
            padded = gs.Variable(f"{name}_out", dtype=src.dtype)
            graph.nodes.append(gs.Node(
                "Pad", name=name, attrs={"mode": "constant"}, outputs=[padded],
                inputs=[src, gs.Constant(f"{name}_pads", full),
                        gs.Constant(f"{name}_value", np.array(-np.inf, dtype=src.dtype or np.float32))]))
            node.inputs[0] = padded
        del node.attrs["pads"]
        node.attrs["auto_pad"] = "VALID"
        changed += 1
    return changed


def _quiet_gs_logger() -> contextlib.AbstractContextManager[None]:
    """Temporarily raise graphsurgeon's global logger to ERROR (fold_constants warns on every skipped node)."""
    from onnx_graphsurgeon.logger import G_LOGGER

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        old = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.ERROR
        try:
            yield
        finally:
            G_LOGGER.severity = old

    return quiet()


def _has_external_data(model: Any) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def cleanup_onnx(src: Path, dst: Path) -> dict[str, Any]:
    """Tidy an ONNX graph with onnx-graphsurgeon: fold constants, bypass Identity nodes, drop dead nodes.

    Passes repeat until the node count stops changing (like ``polygraphy surgeon sanitize``), so running this
    on its own output is a no-op. The source's IR version and opsets are kept: graphsurgeon would otherwise
    stamp the onnx package's newest IR (14), which ONNX Runtime 1.31 refuses (docs/onnx-runtime.md §1). This does
    not make inference faster: ORT performs the same rewrites when it loads the model (docs/onnx-runtime.md §2).

    Args:
        src: the input ``.onnx`` file.
        dst: where to write the cleaned file (may equal ``src``); it is validated with :func:`check_onnx`.

    Returns:
        ``{"nodes_before", "nodes_after", "op_counts_before", "op_counts_after"}`` for the top-level graph.

    Raises:
        DeployPruneError: the source cannot be read or the cleaned graph fails the checker.
    """
    import onnx
    import onnx_graphsurgeon as gs

    src, dst = Path(src), Path(dst)
    try:
        external = _has_external_data(onnx.load(str(src), load_external_data=False))
        model = onnx.load(str(src))
    except Exception as exc:
        raise DeployPruneError(f"cannot read ONNX model {src}: {_one_line(exc)}") from exc
    before = _op_counts(model)

    graph = gs.import_onnx(model)
    with _quiet_gs_logger(), _captured_output():
        count, protected = len(graph.nodes), 0
        for _ in range(_MAX_CLEANUP_PASSES):
            graph.toposort()  # fold_constants needs topological order
            graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=_FOLD_SIZE_THRESHOLD)
            _remove_identities(graph)
            protected += _protect_padded_maxpools(graph)
            graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False).toposort()
            if len(graph.nodes) == count:
                break
            count = len(graph.nodes)
        cleaned = gs.export_onnx(graph, opset_imports=list(model.opset_import))
    cleaned.ir_version = model.ir_version
    cleaned.producer_name, cleaned.producer_version = model.producer_name, model.producer_version
    cleaned.metadata_props.extend(model.metadata_props)

    dst.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder beside dst and move into place, so dst == src works and a failed check
    # never leaves a broken file at dst. A sidecar is named after dst, since the file records its location.
    tmp_dir = Path(tempfile.mkdtemp(prefix=".cleanup-", dir=dst.parent))
    tmp = tmp_dir / dst.name
    try:
        if external:
            onnx.save_model(cleaned, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=sidecar_of(dst).name, size_threshold=1024)
        else:
            onnx.save_model(cleaned, str(tmp))
        check_onnx(tmp)
        if external:
            sidecar_of(tmp).replace(sidecar_of(dst))
        else:
            sidecar_of(dst).unlink(missing_ok=True)
        tmp.replace(dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    after = _op_counts(cleaned)
    return {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "op_counts_before": before,
        "op_counts_after": after,
        "maxpools_protected": protected,
    }


# ----------------------------------------------------------------------------------------------------------
# parity


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Disable TF32 in PyTorch so a CUDA reference is real fp32 (cuDNN convs default to TF32)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _as_numpy_list(out: Any) -> list[tuple[str, np.ndarray]]:
    """A model output (tensor, or dict/tuple/list of tensors) as (name, float64 array) pairs in export order."""
    return [(n, t.detach().cpu().double().numpy()) for n, t in named_outputs(out)]


def parity(
    onnx_path: Path, model: nn.Module, inputs: Sequence[torch.Tensor], *, provider: str = "cpu"
) -> dict[str, Any]:
    """Compare ONNX Runtime's output with PyTorch's on the same inputs.

    The check is ``np.allclose(ort, torch, rtol=1e-3, atol=1e-4 * max|y_ref|)`` over every input and output
    element: both tolerances scale with the output, so a model whose logits underflow to ~1e-21 (random-init
    EfficientNets, docs/onnx-runtime.md §8) is judged by its *relative* error and cannot pass trivially, while a
    real mismatch of the same tiny model still fails. An output that is identically zero proves nothing and
    is compared at the classifier's input instead (:mod:`deploy_prune.headprobe`; the result adds
    ``head_input``), and where that is impossible it is a BadInput asking for trained weights. ``note`` flags
    near-zero outputs (max|y| < 1e-6) and zero outputs so the report can say so.

    The model is run in eval mode with gradients off, on its own device with TF32 disabled; its train/eval
    mode is restored afterwards. On CUDA, ORT runs with ``use_tf32=0`` for the same reason.

    Args:
        onnx_path: the exported file (one input).
        model: the PyTorch reference.
        inputs: input batches; each is run through both.
        provider: ``"cpu"``, ``"cuda"`` or ``"auto"`` (see :func:`deploy_prune.bench.make_session`).

    A model with several outputs (a dict, tuple or list of tensors) is compared output by output, each with
    tolerances scaled to its own magnitude; an output that is identically zero on every input fails.

    Returns:
        ``{"max_abs_diff": float, "max_rel_diff": float, "ok": bool, "ref_max_abs": float, "note": str|None,
        "outputs": {name: {"shape", "max_abs_diff", "ref_max_abs", "ok"}}}`` where ``max_rel_diff = max|Δ| /
        max|y_ref|`` (0 when both are 0, and finite otherwise) and ``shape`` is the output's shape at the first
        input.

    Raises:
        DeployPruneError: no inputs, or the outputs have different counts or shapes.
        BadInput: PyTorch's output holds NaN/inf, or it is identically zero and cannot be checked otherwise.
    """
    from deploy_prune.bench import make_session  # bench does not import this module: no cycle

    if not inputs:
        raise DeployPruneError("parity needs at least one input batch")
    session = make_session(Path(onnx_path), provider, threads=None, cuda_options={"use_tf32": "0"})
    input_name = session.get_inputs()[0].name

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    max_abs = 0.0
    ref_max = 0.0
    ok = True
    head: dict[str, Any] | None = None
    per: dict[str, dict[str, Any]] = {}  # output name -> its shape at the first input, max|diff|, max|y|
    try:
        with torch.no_grad(), _no_tf32():
            for x in inputs:
                ref = _as_numpy_list(model(x.to(device)))
                got = session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32)})
                if len(got) != len(ref):
                    raise DeployPruneError(f"{onnx_path}: ONNX gives {len(got)} outputs, PyTorch {len(ref)}")
                for (name, r), g in zip(ref, got):
                    g = np.asarray(g, dtype=np.float64)
                    if g.shape != r.shape:
                        raise DeployPruneError(f"{onnx_path}: output {name!r} has shape {g.shape} in ONNX, "
                                               f"{r.shape} in PyTorch")
                    if not np.all(np.isfinite(r)):
                        raise BadInput(f"{Path(onnx_path).name}: the PyTorch model's output holds NaN or infinite "
                                       f"values on a random input of shape {tuple(x.shape)}, so nothing can be "
                                       "verified: check its weights and normalisation layers")
                    scale = float(np.max(np.abs(r))) if r.size else 0.0
                    atol = _ATOL_FACTOR * scale
                    close = bool(np.allclose(g, r, rtol=_RTOL, atol=atol))
                    ok &= close
                    d = np.abs(g - r)
                    diff = (float(np.max(d)) if np.all(np.isfinite(d)) else math.inf) if r.size else 0.0
                    max_abs = max(max_abs, diff)
                    ref_max = max(ref_max, scale)
                    row = per.setdefault(name, {"shape": list(r.shape), "max_abs_diff": 0.0, "ref_max_abs": 0.0,
                                                "ok": True})
                    row["max_abs_diff"] = max(row["max_abs_diff"], diff)
                    row["ref_max_abs"] = max(row["ref_max_abs"], scale)
                    row["ok"] = row["ok"] and close
            head = _zero_output_probe(Path(onnx_path), model, inputs, provider) if ref_max == 0.0 else None
    finally:
        model.train(was_training)

    note = None
    zero = [n for n, row in per.items() if row["ref_max_abs"] == 0.0]
    if head is not None:
        ok = ok and head["ok"]
        note = (f"the output is identically zero (the classifier '{head['layer']}' computes 0 for every input, "
                "e.g. a zero-initialised head); parity was proven on the classifier's input instead: max|diff| "
                f"{head['max_abs_diff']:.3g} (rel {head['max_rel_diff']:.3g})")
    elif zero:
        ok = False
        for n in zero:
            per[n]["ok"] = False
        note = (f"output {zero[0]!r} is identically zero on every parity input, which proves nothing about it: "
                "check the model and its inputs")
    elif ref_max < _TINY_OUTPUT:
        note = (f"reference output is near zero (max|y|={ref_max:.3g}); parity was judged relative to that "
                "scale: verify with trained weights for outputs of order 1")
    if max_abs == 0.0:
        rel = 0.0
    else:
        rel = max_abs / max(ref_max, float(np.finfo(np.float32).tiny))
    out = {"max_abs_diff": max_abs, "max_rel_diff": rel, "ok": bool(ok), "ref_max_abs": ref_max, "note": note,
           "outputs": per}
    if head is not None:
        out["head_input"] = head
    return out


def parity_failure(par: dict[str, Any]) -> tuple[bool, str]:
    """``(disagrees, detail)`` for a failed :func:`parity` result: whether a difference was measured, and the
    numbers that show it (at the classifier's input when the output itself is identically zero)."""
    if "top1_agreement" in par:  # int8: a classification question, not a numerical one
        return True, f"top-1 agreement {par['top1_agreement']:.3f}"
    head = par.get("head_input")
    if head is not None and par["max_abs_diff"] == 0.0:
        return head["max_abs_diff"] > 0, (f"output identically zero; classifier input max|diff| "
                                          f"{head['max_abs_diff']:.3g} (rel {head['max_rel_diff']:.3g})")
    return par["max_abs_diff"] > 0, f"max|diff| {par['max_abs_diff']:.3g} (rel {par.get('max_rel_diff', 0):.3g})"


def _zero_output_probe(onnx_path: Path, model: nn.Module, inputs: Sequence[torch.Tensor],
                       provider: str) -> dict[str, Any]:
    """For an identically zero output: the classifier-input comparison (:mod:`deploy_prune.headprobe`), or a
    one-line BadInput saying why parity cannot prove this file."""
    from deploy_prune.headprobe import ProbeUnavailable, compare_head_input

    try:
        return compare_head_input(onnx_path, model, inputs, provider=provider, rtol=_RTOL,
                                  atol_factor=_ATOL_FACTOR)
    except ProbeUnavailable as exc:
        why = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means it cannot prove anything
        why = _one_line(exc)
    raise BadInput(f"{onnx_path.name}: the model's output is identically zero on every parity input, so "
                   f"comparing ONNX Runtime with PyTorch proves nothing, and the classifier's input cannot be "
                   f"compared instead ({why}): load trained weights into the model ({opt('weights')})")
