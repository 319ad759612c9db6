"""The ``int8`` variant: the structured model's ONNX file, statically quantized with ONNX Runtime.

How it is made (docs/onnx-runtime.md §9):

1. ``onnxruntime.quantization.quant_pre_process`` on the cleaned fp32 ``model.onnx`` (symbolic shape
   inference, ORT graph optimization, ONNX shape inference);
2. ``quantize_static`` in the **QDQ** format (QuantizeLinear/DequantizeLinear pairs that ORT fuses into
   integer kernels), **u8 activations / s8 weights, per-channel weights**, activation ranges calibrated on
   images of the run's ``--data`` *train* split (``--calib-method minmax|entropy|percentile``);
3. ``reduce_range`` (7-bit weights) is chosen from the CPU: on x86 without VNNI, ORT's u8×s8 kernels
   (``vpmaddubsw``) can saturate their 16-bit intermediate sums, so ranges are reduced; with VNNI
   (``avx512_vnni``, ``avx_vnni``) or AMX they are not (:func:`choose_reduce_range`).

Parity for an int8 model is a classification question, not a numerical one: :func:`derive` runs the fp32
structured file and the int8 file on every image of the validation split and reports the share whose top-1
class agrees (``parity.top1_agreement``), the int8 accuracy and the largest logit difference. The variant
fails parity when the agreement is below ``int8_min_agreement``.

ONNX Runtime is imported only inside the functions that need it, so importing this module (the variant
registry does) loads no runtime.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deploy_prune.criteria.base import CriterionOptions, option
from deploy_prune.errors import BadInput, DeployPruneError, opt

if TYPE_CHECKING:
    from deploy_prune.variants import DeriveContext, Derived

__all__ = ["Int8Options", "CALIB_METHODS", "VNNI_FLAGS", "cpu_flags", "choose_reduce_range", "quantize_onnx",
           "qdq_counts", "derive", "NEEDS_DATA"]

#: ``--calib-method`` → ``onnxruntime.quantization.CalibrationMethod`` member.
CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: ``/proc/cpuinfo`` flags whose presence means 8-bit dot products without 16-bit saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: What the int8 variant needs ``--data`` for (the CLI's "needs --data" error).
NEEDS_DATA = ("real images to calibrate its activation ranges (ranges from random inputs are meaningless)")
# The share of validation images whose top-1 class must match the fp32 structured model's by default.
DEFAULT_MIN_AGREEMENT = 0.9
# Calibration images are fed to ONNX Runtime in chunks of this many (bounds the calibrator's memory per run).
_CALIB_CHUNK = 16


@dataclass(frozen=True)
class Int8Options(CriterionOptions):
    """The int8 variant's options (``--calib-method`` ... on the command line)."""

    calib_method: str = option("minmax", "INT8 calibration of activation ranges on --data's train split: minmax "
                               "(observed min/max), entropy (KL-divergence histogram) or percentile "
                               "(99.999th percentile histogram).", choices=tuple(CALIB_METHODS))
    int8_calib_images: int = option(256, "INT8: train images used for calibration (entropy and percentile keep "
                                    "all their activations in memory).", minimum=1, integer=True)
    int8_min_agreement: float = option(DEFAULT_MIN_AGREEMENT, "INT8: the share of validation images whose top-1 "
                                       "class must match the fp32 structured model's, or the run fails parity.",
                                       minimum=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.int8_min_agreement > 1:
            raise BadInput(f"{opt('int8_min_agreement')} must be between 0 and 1, got {self.int8_min_agreement!r}")


# ----------------------------------------------------------------------------------------------------------
# the CPU


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (or of the text given), lower-case; empty where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.lower().split())
    return flags


def choose_reduce_range(flags: Iterable[str] | str, machine: str = "x86_64") -> tuple[bool, str]:
    """Whether to quantize with ``reduce_range`` on a CPU with these feature flags, and why.

    Args:
        flags: the CPU's flags (a ``/proc/cpuinfo`` ``flags`` line, or a collection of flag names).
        machine: ``platform.machine()``; reduce_range only matters on x86.

    Returns:
        ``(reduce_range, reason)``. x86 with ``avx512_vnni``, ``avx_vnni`` or ``amx_int8``: False (VNNI sums
        u8×s8 products straight into 32 bits). x86 without them: True (AVX2's ``vpmaddubsw`` adds pairs of u8×s8
        products into 16 bits and can saturate with full-range u8 activations and s8 weights). Other
        architectures: False.
    """
    names = set(flags.lower().split()) if isinstance(flags, str) else {f.lower() for f in flags}
    arch = machine.lower()
    if arch not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False, f"{machine} CPU: reduce_range is an x86 (AVX2 u8×s8 saturation) setting, not needed here"
    found = [f for f in VNNI_FLAGS if f in names]
    if found:
        return False, (f"the CPU has VNNI ({', '.join(found)}): u8×s8 products are summed in 32 bits, full 8-bit "
                       "ranges cannot saturate")
    if not names:
        return True, ("the CPU's flags are unknown: reduce_range (7-bit weights) is the safe choice without VNNI, "
                      "where AVX2's 16-bit pair sums can saturate")
    return True, ("the CPU has no VNNI (no avx512_vnni, avx_vnni or amx_int8 flag): AVX2's vpmaddubsw sums pairs of "
                  "u8×s8 products in 16 bits and can saturate, so weights are quantized to 7 bits (reduce_range)")


# ----------------------------------------------------------------------------------------------------------
# quantization


def _calibration_images(data: Any, count: int, seed: int) -> torch.Tensor:
    """``count`` images of the train split (a seeded choice, the same for every run with this seed)."""
    dataset = data.train.dataset
    n = len(dataset)
    if n == 0:
        raise BadInput(f"{opt('data')} {getattr(data, 'name', '')} has an empty train split: INT8 calibration "
                       "needs training images")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)].tolist()
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).float()


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a tensor of images, in chunks.

    ``__len__`` and ``set_range`` let ``quantize_static`` calibrate one chunk at a time
    (``CalibStridedMinMax``), so the calibrator holds one chunk's activations, not all of them.
    """

    def __init__(self, input_name: str, images: torch.Tensor, chunk: int = _CALIB_CHUNK) -> None:
        self.input_name, self.images, self.chunk = input_name, images, chunk
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.images) // self.chunk)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            {self.input_name: self.images[i * self.chunk: (i + 1) * self.chunk].numpy().astype(np.float32)}
            for i in range(start_index, min(end_index, len(self))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self.set_range(0, len(self))


def qdq_counts(path: Path) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear / QLinear* / integer nodes the file has."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type.startswith(("QLinear", "ConvInteger",
                                                                                              "MatMulInteger")):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_onnx(src: Path, dst: Path, images: torch.Tensor, *, calib_method: str = "minmax",
                  reduce_range: bool = False, per_channel: bool = True, quant_format: str = "QDQ",
                  activation_type: str = "QUInt8", weight_type: str = "QInt8",
                  extra_options: dict[str, Any] | None = None, preprocess: bool = True) -> dict[str, Any]:
    """Statically quantize the fp32 ONNX file ``src`` into ``dst``, calibrated on ``images``.

    Args:
        src: the fp32 model (one input).
        dst: the quantized file to write.
        images: calibration inputs, ``(N, C, H, W)``.
        calib_method: ``minmax``, ``entropy`` or ``percentile``.
        reduce_range: 7-bit weights (see :func:`choose_reduce_range`).
        per_channel: one scale per output channel of each weight.
        quant_format: ``QDQ`` or ``QOperator``.
        activation_type, weight_type: ``QUInt8`` or ``QInt8``.
        extra_options: passed to ``quantize_static`` (merged over the defaults used here).
        preprocess: run ``quant_pre_process`` first (the ORT docs recommend it).

    Returns:
        The settings used, as the report's ``quantization`` block.

    Raises:
        BadInput: unknown calibration method.
        DeployPruneError: ONNX Runtime's quantizer failed.
    """
    if calib_method not in CALIB_METHODS:
        raise BadInput(f"{opt('calib_method')} {calib_method!r} is not valid: use one of {', '.join(CALIB_METHODS)}")
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8.", dir=Path(dst).parent) as tmp:
        model_in = Path(src)
        if preprocess:
            model_in = Path(tmp) / "preprocessed.onnx"
            try:
                quant_pre_process(str(src), str(model_in))
            except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
                # ONNX shape inference alone is enough for quantize_static.
                quant_pre_process(str(src), str(model_in), skip_symbolic_shape=True)
        input_name = onnx.load(str(model_in), load_external_data=False).graph.input[0].name
        # One chunk at a time: ORT merges min/max ranges and histograms across calls to collect_data.
        # (Not CalibMaxIntermediateOutputs: in 1.31.1 it drops the outputs it clears instead of merging them.)
        options = {"CalibStridedMinMax": 1, **(extra_options or {})}
        try:
            quantize_static(str(model_in), str(dst), _Reader(input_name, images),
                            quant_format=getattr(QuantFormat, quant_format), per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=getattr(QuantType, activation_type),
                            weight_type=getattr(QuantType, weight_type),
                            calibrate_method=getattr(CalibrationMethod, CALIB_METHODS[calib_method]),
                            calibration_providers=["CPUExecutionProvider"], extra_options=options)
        except Exception as exc:  # noqa: BLE001 - ORT raises plain exceptions of many types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DeployPruneError(f"ONNX Runtime could not quantize {Path(src).name} ({first})") from exc
    return {"tool": f"onnxruntime.quantization {ort.__version__}: quant_pre_process + quantize_static"
                    if preprocess else f"onnxruntime.quantization {ort.__version__}: quantize_static",
            "format": quant_format, "activation_type": activation_type, "weight_type": weight_type,
            "per_channel": per_channel, "reduce_range": reduce_range,
            "calibration": {"method": calib_method, "images": int(len(images)), "split": "train"},
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------------------
# the variant


def _logits(session: Any, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    name = session.get_inputs()[0].name
    outs, labels = [], []
    for x, y in loader:
        outs.append(np.asarray(session.run(None, {name: x.numpy().astype(np.float32)})[0], dtype=np.float64))
        labels.append(np.asarray(y))
    return np.concatenate(outs), np.concatenate(labels)


def compare(fp32: Path, int8: Path, loader: Iterable[Any], threads: int | None = None) -> dict[str, Any]:
    """Run both files on ONNX Runtime's CPU provider over ``loader`` (image, label batches).

    Returns:
        ``top1_agreement`` (share of images where both pick the same class), ``accuracy`` and
        ``fp32_accuracy`` (top-1 %), ``max_abs_diff`` of the logits, ``images``.
    """
    from deploy_prune.bench import make_session

    a, labels = _logits(make_session(fp32, "cpu", threads), loader)
    b, _ = _logits(make_session(int8, "cpu", threads), loader)
    if len(labels) == 0:
        raise BadInput(f"the validation split is empty: INT8 parity needs validation images ({opt('data')})")
    pa, pb = a.argmax(1), b.argmax(1)
    return {"top1_agreement": float((pa == pb).mean()), "accuracy": float(100 * (pb == labels).mean()),
            "fp32_accuracy": float(100 * (pa == labels).mean()), "max_abs_diff": float(np.abs(a - b).max()),
            "images": int(len(labels))}


def derive(ctx: DeriveContext) -> Derived:
    """Make the int8 variant from the structured model's cleaned ONNX file (``Variant.derive``)."""
    import platform

    from deploy_prune.bench import CUDA
    from deploy_prune.metrics import count_macs, count_nonzero, count_params
    from deploy_prune.variants import Derived

    options: Int8Options = ctx.options or Int8Options()
    if ctx.data is None:
        raise BadInput(f"{opt('int8')} needs {NEEDS_DATA}: pass {opt('data')} mnist5k or {opt('data')} "
                       "imagefolder:DIR")
    flags = cpu_flags()
    reduce_range, reason = choose_reduce_range(flags, platform.machine())
    images = _calibration_images(ctx.data, options.int8_calib_images, ctx.seed)
    q = quantize_onnx(ctx.source_path, ctx.path, images, calib_method=options.calib_method,
                      reduce_range=reduce_range)
    q["reduce_range_reason"] = reason
    q["cpu_int8_flags"] = sorted(f for f in flags if f in VNNI_FLAGS or f.startswith(("avx512_vnni", "amx")))
    q["qdq_nodes"] = qdq_counts(ctx.path)
    cmp = compare(ctx.source_path, ctx.path, ctx.data.val, ctx.threads)
    ok = cmp["top1_agreement"] >= options.int8_min_agreement
    parity = {"max_abs_diff": cmp["max_abs_diff"], "ok": ok, "top1_agreement": cmp["top1_agreement"]}
    details: dict[str, Any] = {
        "quantization": q,
        "parity": {"reference": "the fp32 structured model.onnx on ONNX Runtime's CPU provider",
                   "split": "val", "images": cmp["images"], "fp32_accuracy": cmp["fp32_accuracy"],
                   "min_top1_agreement": options.int8_min_agreement},
    }
    notes = [f"int8: {options.calib_method} calibration on {len(images)} train images, QDQ u8/s8 per-channel, "
             f"reduce_range={reduce_range} ({reason}); top-1 agreement with fp32 structured "
             f"{100 * cmp['top1_agreement']:.1f}% on {cmp['images']} val images"]
    if ctx.provider == CUDA:
        why = ("ONNX Runtime's CUDA provider has no INT8 convolution kernels (no QLinearConv; QDQ convs run as "
               "dequantize + fp32 conv or fall back to the CPU), so the int8 latency measured here says nothing "
               "about INT8 speed; use the TensorRT provider for GPU INT8")
        details["latency"] = {"meaningful": False, "reason": why}
        notes.append(f"int8 latency not meaningful on {CUDA}: {why}")
    else:
        details["latency"] = {"meaningful": True, "reason": f"measured on {ctx.provider} in the same interleaved run"}
    # The int8 file holds the same architecture as the structured model: parameter and MAC counts are its.
    m = ctx.source_model
    return Derived(params=count_params(m), nonzero_params=count_nonzero(m), macs=count_macs(m, ctx.input_shape),
                   accuracy=cmp["accuracy"], parity=parity, details=details, notes=notes)
