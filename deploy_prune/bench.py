"""Latency benchmarking of ONNX files on ONNX Runtime, done so that the numbers can be compared.

How the comparison is made fair (``docs/onnx-runtime.md`` §3 and §7):

* Every session is created up front with the same options: ``ORT_ENABLE_ALL``, a fixed number of intra-op
  threads, one inter-op thread, sequential execution and **thread spinning off**. With spinning on, the idle
  thread pools of the sessions not being timed keep the cores busy and steal them from the one that is
  (measured on a 2-core VM: medians nearly doubled).
* Variants are interleaved in **blocks**: ``block`` consecutive runs of one variant, then the next, with the
  order rotated every round and the first ``drop`` runs of each block thrown away (they pay for the cache
  misses left by the previous variant). Interleaving cancels the drift of a shared machine; blocks keep each
  model's weights warm.
* All variants see the same seeded random input; ``time.perf_counter_ns`` brackets ``run()`` only. On CUDA
  the input and outputs are bound on the device (IOBinding), so host/device copies are not timed.
* The provider that really ran is read from ``session.get_providers()[0]``: onnxruntime-gpu advertises CUDA
  even on machines without a GPU and then silently runs on CPU (§5).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: F401  # must be imported before onnxruntime: ORT's CUDA EP reuses torch's CUDA/cuDNN libraries

import onnxruntime as ort
from tqdm import tqdm

from deploy_prune.errors import BadInput, DeployPruneError, opt
from deploy_prune.progress import tqdm_options
from deploy_prune.timing import BenchResult, LatencyStats

__all__ = [
    "CPU",
    "CUDA",
    "LatencyStats",
    "BenchResult",
    "default_threads",
    "resolve_provider",
    "make_session",
    "benchmark",
    "bench_files",
    "benchmark_controlled",
]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CONTROL_TOLERANCE = 0.03  # how far apart (relative) a control pair's p50s may be before the run is timed again
CONTROL_ATTEMPTS = 3  # interleaved runs at most, when the control pair keeps disagreeing
MAX_ITERS = 20000  # the most timed runs per variant that ``min_seconds`` asks for
_ALIASES = {"cpu": CPU, "cuda": CUDA, CPU.lower(): CPU, CUDA.lower(): CUDA}

# ORT element types we can synthesize a benchmark input for.
_NUMPY_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


# ----------------------------------------------------------------------------------------------------------
# providers and sessions


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def environment(result: BenchResult) -> dict[str, Any]:
    """The report's ``environment``: what really ran (provider, versions, threads, machine)."""
    import platform

    return {"provider": result.provider, "onnxruntime": result.onnxruntime, "torch": torch.__version__,
            "intra_op_threads": int(result.threads), "world_size": 1, "python": platform.python_version(),
            "machine": platform.machine(), "processor": cpu_name()}


def default_threads() -> int:
    """The intra-op thread count used when none is given: the CPUs this process may run on.

    ``sched_getaffinity`` respects container CPU limits where ``os.cpu_count()`` does not.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _capture_fd2() -> Iterator[io.StringIO]:
    """Capture what native code writes to file descriptor 2 (ORT logs from C++, not via ``sys.stderr``)."""
    buf = io.StringIO()
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError):
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read().decode("utf-8", "replace"))


def _probe_model_bytes() -> bytes:
    """A one-node ONNX model (``y = Relu(x)``) built in memory, for provider probing.

    ``ir_version`` is pinned to 10: onnx 1.23's helper stamps IR 14, which ORT 1.31 rejects (docs/onnx-runtime.md §1).
    """
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "provider_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _failure_reason(log: str) -> str:
    """Pick the most useful line out of ORT's CUDA-EP load errors."""
    for line in log.splitlines():
        if "with error:" in line:
            return line.split("with error:", 1)[1].strip()
    for line in log.splitlines():
        if "Failed to create CUDAExecutionProvider" in line:
            return "failed to create CUDAExecutionProvider; CUDA 13 and cuDNN 9 are required"
    return "no usable GPU; ONNX Runtime fell back to CPU"


@functools.lru_cache(maxsize=1)
def _cuda_probe() -> tuple[bool, str]:
    """Whether the CUDA execution provider really runs here, and if not, why (cached per process)."""
    if CUDA not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} has no CUDA execution provider; install onnxruntime-gpu"
    # torch is imported already, which loads its CUDA libraries; preload_dlls() covers torch-less layouts.
    # It prints (not logs) when a library is missing, hence the redirect.
    with contextlib.redirect_stdout(io.StringIO()), _capture_fd2():
        try:
            ort.preload_dlls()
        except Exception:  # best effort: a failure here shows up in the probe session below
            pass
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: they carry the reason we report
    with _capture_fd2() as log:
        try:
            session = ort.InferenceSession(_probe_model_bytes(), options, providers=[CUDA, CPU])
        except Exception as exc:
            return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if session.get_providers()[0] == CUDA:
        return True, ""
    return False, _failure_reason(log.getvalue())


def resolve_provider(requested: str) -> str:
    """Turn ``auto`` / ``cpu`` / ``cuda`` into the execution provider that will really run.

    A probe session is created on a tiny in-memory model and ``get_providers()[0]`` is read; the advertised
    provider list cannot be trusted (docs/onnx-runtime.md §5). The result is cached per process.

    Args:
        requested: ``"auto"`` (CUDA if it really runs, else CPU), ``"cpu"``, ``"cuda"``; full provider names
            (``"CPUExecutionProvider"``) are accepted too.

    Returns:
        ``"CPUExecutionProvider"`` or ``"CUDAExecutionProvider"``.

    Raises:
        BadInput: unknown name, or ``"cuda"`` requested where CUDA cannot run.
    """
    key = requested.strip().lower()
    if key != "auto" and key not in _ALIASES:
        raise BadInput(f"unknown provider {requested!r}: choose auto, cpu or cuda")
    if _ALIASES.get(key) == CPU:
        return CPU
    usable, reason = _cuda_probe()
    if usable:
        return CUDA
    if key == "auto":
        logger.info("CUDA execution provider unavailable (%s); using CPU", reason)
        return CPU
    raise BadInput(f"CUDA execution provider cannot run here ({reason}): use {opt('provider')} cpu or auto")


def make_session(
    path: Path | bytes,
    provider: str = "cpu",
    threads: int | None = None,
    *,
    cuda_options: Mapping[str, str] | None = None,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """Create an ONNX Runtime session with the benchmark's fixed options.

    Options: ``ORT_ENABLE_ALL``, ``intra_op_num_threads=threads``, one inter-op thread, sequential execution,
    and ``session.intra_op.allow_spinning=0`` so that idle sessions do not steal cores (docs/onnx-runtime.md §7).
    On CUDA the provider options default to ``cudnn_conv_algo_search=HEURISTIC`` (EXHAUSTIVE makes the first
    run per shape very slow), overridable through ``cuda_options`` (e.g. ``{"use_tf32": "0"}`` for parity).

    Args:
        path: the ``.onnx`` file, or a serialized model in memory.
        provider: ``"auto"``, ``"cpu"``, ``"cuda"`` or a full provider name (see :func:`resolve_provider`).
        threads: intra-op threads; ``None`` means :func:`default_threads`.
        cuda_options: extra CUDA provider options, merged over the defaults.
        profile_prefix: turn ONNX Runtime's profiler on, writing its JSON to this path prefix
            (``benchmarks/table_timing.py`` reads per-kernel times from it).

    Returns:
        The session; ``session.get_providers()[0]`` is the provider requested.

    Raises:
        BadInput: the file does not exist, the provider name is unknown, or CUDA was asked for and cannot run.
        DeployPruneError: ONNX Runtime cannot load the model, or it did not place it on the requested provider.
    """
    if not isinstance(path, bytes):
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: no such ONNX file")
    where = "in-memory model" if isinstance(path, bytes) else str(path)
    ep = resolve_provider(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads if threads is not None else default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if ep == CUDA:
        opts = {"cudnn_conv_algo_search": "HEURISTIC", **dict(cuda_options or {})}
        providers: list[Any] = [(CUDA, opts), CPU]
    else:
        providers = [CPU]
    try:
        session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployPruneError(f"{where}: ONNX Runtime cannot load it ({msg})") from exc
    if session.get_providers()[0] != ep:
        placed = session.get_providers()[0]
        raise DeployPruneError(f"{where}: asked for {ep} but ONNX Runtime placed the model on {placed}")
    return session


# ----------------------------------------------------------------------------------------------------------
# benchmark


def _input_signature(session: ort.InferenceSession, where: str) -> tuple[str, str, list[int | str | None]]:
    """(name, element type, shape) of the session's only input; BadInput unless there is exactly one."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise BadInput(f"{where}: the model has {len(inputs)} inputs ({names}); bench supports single-input models")
    return inputs[0].name, inputs[0].type, list(inputs[0].shape)


def _check_shape(model_shape: Sequence[int | str | None], shape: tuple[int, ...], where: str) -> None:
    """BadInput unless ``shape`` fits the model's input (same rank, same static dims)."""
    fits = len(model_shape) == len(shape) and all(
        not isinstance(d, int) or d <= 0 or d == s for d, s in zip(model_shape, shape)
    )
    if not fits:
        raise BadInput(
            f"{where}: the model's input is {_fmt_shape(model_shape)} but the benchmark input is "
            f"{'x'.join(map(str, shape))}; pass a matching {opt('input_shape')}"
        )


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def make_runner(session: ort.InferenceSession, x: np.ndarray, provider: str) -> Callable[[], Any]:
    """A zero-argument callable that runs one inference of ``session`` on ``x``.

    On CUDA the input is copied to the device once and the outputs are bound to the device, so ``run``
    measures device compute plus launch overhead, not PCIe copies (IOBinding, docs/onnx-runtime.md §6).
    """
    name = session.get_inputs()[0].name
    if provider == CUDA:
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, x_dev)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def run_cuda() -> Any:
            # x_dev is captured so the device buffer outlives the binding.
            _ = x_dev
            return session.run_with_iobinding(binding)

        return run_cuda
    feed = {name: x}
    return lambda: session.run(None, feed)


def _method_sentence(
    provider: str, threads: int, n_models: int, iters: int, warmup: int, block: int, drop: int, shape: tuple[int, ...]
) -> str:
    """One sentence for the report saying exactly how the latencies were measured."""
    where = "with IOBinding (input/output on the GPU, copies not timed)" if provider == CUDA else "from host memory"
    return (
        f"ONNX Runtime {ort.__version__} on {provider}, ORT_ENABLE_ALL, {threads} intra-op thread(s), "
        f"thread spinning off; all {n_models} sessions created up front and warmed up with {warmup} runs each, "
        f"then run in interleaved blocks of {block} consecutive runs per variant (order rotated every round, "
        f"first {drop} runs of each block dropped) until each had {iters} kept runs; one seeded random "
        f"{'x'.join(map(str, shape))} input {where}, timed with perf_counter_ns around each run."
    )


def benchmark(
    models: Mapping[str, Path],
    input_shape: tuple[int, ...],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    iters: int = 100,
    warmup: int = 10,
    block: int = 10,
    drop: int = 2,
    seed: int = 0,
    progress: bool = True,
    min_seconds: float = 0.0,
    total_seconds: float = 0.0,
) -> BenchResult:
    """Measure the latency of several ONNX files in one interleaved run (see the module docstring).

    Args:
        models: variant name → ``.onnx`` path (e.g. ``{"dense": ..., "structured": ...}``).
        input_shape: the input batch's shape, e.g. ``(1, 3, 224, 224)``.
        provider: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        threads: intra-op threads per session; ``None`` = :func:`default_threads`.
        iters: kept timed runs per variant.
        warmup: untimed runs per variant before timing.
        block: consecutive runs of one variant per round.
        drop: runs discarded at the start of each block (cache refill after switching variant).
        seed: seed of the random input.
        progress: show a tqdm bar on stderr.
        min_seconds: raise ``iters`` (up to :data:`MAX_ITERS`) until the fastest variant, at the speed its
            warm-up runs show, is timed for at least this long. A sub-millisecond model timed 50 or 100 times
            is timed for a few milliseconds: on a 2-core VM the speedup of a 0.13 ms digits model varied by
            2.5-2.8% (coefficient of variation) from run to run that way, by 1.4% when timed for 0.5 s
            (docs/onnx-runtime.md §3). 0 = exactly ``iters``.
        total_seconds: raise ``iters`` (up to :data:`MAX_ITERS`) until the whole interleaved run, at the speeds
            the warm-up runs show, lasts at least this long. More rounds average out more of a shared
            machine's slow spells: ConvNeXt-T against a 1.4x faster pruned copy, six runs each on a 2-vCPU VM,
            measured 1.34-1.46x (coefficient of variation 3.1%) at 100 iterations (35 s a run) and 1.39-1.43x
            (1.2%) at 400 (128 s) (docs/onnx-runtime.md §3). 0 = no such floor.

    Returns:
        A :class:`BenchResult`; every variant has exactly ``iters`` samples (``result.iters``: as raised by
        ``min_seconds``).

    Raises:
        BadInput: no models, bad protocol numbers, a missing file, an input shape the models do not accept,
            or CUDA requested where it cannot run.
        DeployPruneError: a model cannot be loaded or runs on an unexpected provider.
    """
    if not models:
        raise BadInput("nothing to benchmark: give at least one ONNX file")
    if iters < 1 or warmup < 0 or drop < 0 or block <= drop:
        raise BadInput(
            f"bad benchmark settings iters={iters} warmup={warmup} block={block} drop={drop}: "
            "need iters >= 1, warmup >= 0 and block > drop >= 0"
        )
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise BadInput(f"bad input shape {input_shape!r}: every dimension must be a positive integer")
    ep = resolve_provider(provider)
    n_threads = threads if threads is not None else default_threads()

    # Every session exists before any timing starts (and with spinning off, idle ones cost nothing).
    sessions = {name: make_session(Path(p), ep, n_threads) for name, p in models.items()}
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, dtype=np.float32)
    runners: dict[str, Callable[[], Any]] = {}
    for name, session in sessions.items():
        where = f"{models[name]}"
        _, elem_type, model_shape = _input_signature(session, where)
        if elem_type not in _NUMPY_TYPES:
            raise BadInput(f"{where}: input type {elem_type} is not supported by bench (float, float16, double)")
        _check_shape(model_shape, shape, where)
        runners[name] = make_runner(session, base.astype(_NUMPY_TYPES[elem_type]), ep)

    warm_ms: dict[str, float] = {}  # each variant's speed in its warm-up (median of the later runs)
    for name, run in runners.items():
        times = []
        for _ in range(warmup):
            t0 = time.perf_counter_ns()
            run()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        if times:
            warm_ms[name] = statistics.median(times[len(times) // 2:])
    if min_seconds > 0 and warm_ms:
        iters = max(iters, min(MAX_ITERS, math.ceil(min_seconds * 1e3 / max(min(warm_ms.values()), 1e-3))))
    if total_seconds > 0 and warm_ms:
        per_iter = sum(warm_ms.values()) * block / (block - drop)  # dropped runs take time too
        iters = max(iters, min(MAX_ITERS, math.ceil(total_seconds * 1e3 / max(per_iter, 1e-3))))

    names = list(runners)
    kept: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be an outlier unrelated to the model
    try:
        with tqdm(total=iters * len(names), desc="benchmark", unit="run", **tqdm_options(progress)) as bar:
            round_no = 0
            while any(len(kept[n]) < iters for n in names):
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    if len(kept[name]) >= iters:
                        continue
                    run = runners[name]
                    for i in range(block):
                        t0 = time.perf_counter_ns()
                        run()
                        t1 = time.perf_counter_ns()
                        if i >= drop and len(kept[name]) < iters:
                            kept[name].append((t1 - t0) / 1e6)
                            bar.update(1)
                round_no += 1
    finally:
        if gc_was_enabled:
            gc.enable()

    return BenchResult(
        stats={name: LatencyStats.from_samples(s) for name, s in kept.items()},
        samples=kept,
        provider=ep,
        onnxruntime=ort.__version__,
        threads=n_threads,
        method=_method_sentence(ep, n_threads, len(names), iters, warmup, block, drop, shape),
        input_shape=shape,
        iters=iters,
        warmup=warmup,
        block=block,
        drop=drop,
    )


def benchmark_controlled(
    models: Mapping[str, Path],
    input_shape: tuple[int, ...],
    control: tuple[str, str] | None,
    *,
    reference: str | None = None,
    tolerance: float = CONTROL_TOLERANCE,
    attempts: int = CONTROL_ATTEMPTS,
    say: Callable[[str], None] = lambda _: None,
    **kwargs: Any,
) -> tuple[BenchResult, dict[str, Any]]:
    """:func:`benchmark`, checked twice, and repeated (up to ``attempts`` runs) while a check fails.

    * **A control pair**, two of ``models`` that run the same kernels, so that their p50s must agree (a dense
      model and its unstructured-sparse copy: ONNX Runtime's dense kernels multiply zeros like any other weight).
      On a shared 2-vCPU VM one interleaved run now and then catches one variant in a slow spell of the machine:
      the dense and the sparse model, identical in cost, once measured 15% apart in the same run, and the
      speedup read off that run's dense p50 was 1.40x for a model that measured 1.52x, 1.57x and 1.49x in three
      other runs (docs/onnx-runtime.md §3). ``None``: no control pair.
    * **The speedups read two ways**: from the pooled p50s (:meth:`BenchResult.speedups`, what the report
      states) and round by round (:meth:`BenchResult.paired_speedups`). They agree unless the machine switched
      between a fast and a slow state during the run with about half of the samples in each; then a pooled p50
      is ill-defined (EfficientNet-B0 against a pruned copy: 2.91x from the p50s, 3.24x round by round, 3.2-3.3x
      in each state alone). Only the gap beyond two standard errors of the round-by-round reading counts
      (:meth:`BenchResult.drift`): with few, long rounds that reading is noisy itself.

    A run passes when the control pair's p50s differ by at most ``tolerance`` (relative) and every speedup
    against ``reference`` agrees both ways within ``tolerance`` (``drift``); of the runs made, the one whose
    worse check is smallest is kept. The choice looks only at the checks (agreement of identical models,
    agreement of two readings of the same speedup), never at how fast any variant is.

    Args:
        reference: the variant the speedups are taken against; default the control pair's first.

    Returns:
        The kept run, and a record for the report: the pair, the tolerance, every run's control ratio
        (``p50[control[1]] / p50[control[0]]``), its speedups vs ``reference`` both ways and its ``drift``, and
        which run was kept.

    Raises:
        KeyError: a control or reference name is not in ``models``. Otherwise as :func:`benchmark`.
    """
    if not models:
        raise BadInput("nothing to benchmark: give at least one ONNX file")
    if control is not None and any(name not in models for name in control):
        raise KeyError(f"control pair {control} not among the benchmarked models {list(models)}")
    ref = reference if reference is not None else (control[0] if control else next(iter(models)))
    if ref not in models:
        raise KeyError(f"reference {ref!r} not among the benchmarked models {list(models)}")
    runs: list[tuple[BenchResult, float, float]] = []  # result, control ratio (1 without a pair), drift
    for k in range(max(1, attempts)):
        res = benchmark(models, input_shape, **kwargs)
        ratio = res.stats[control[1]].p50 / res.stats[control[0]].p50 if control else 1.0
        drifts = res.drifts(ref)
        drift = max(drifts.values(), default=0.0)
        runs.append((res, ratio, drift))
        if abs(ratio - 1) <= tolerance and drift <= tolerance:
            break
        if k + 1 < attempts:
            if abs(ratio - 1) > tolerance:
                why = (f"{control[1]} and {control[0]} run the same kernels but their p50s differed by "
                       f"{abs(ratio - 1):.1%}")
            else:
                name = max(drifts, key=drifts.__getitem__)
                why = (f"the machine changed speed during the run: {name}'s speedup was "
                       f"{res.speedups(ref)[name]:.3g}x from the p50s but {res.paired_speedups(ref)[name]:.3g}x "
                       f"round by round, {drift:.1%} apart beyond the rounds' own spread")
            say(f"{why} in this interleaved run (more than {tolerance:.0%}): timing every variant again "
                f"(run {k + 2} of at most {attempts})")
    kept = min(range(len(runs)), key=lambda i: max(abs(math.log(runs[i][1])), runs[i][2]))
    record: dict[str, Any] = {"pair": list(control) if control else None, "tolerance": tolerance,
                              "runs": [], "kept": kept}
    for res, ratio, drift in runs:
        record["runs"].append({
            "control_ratio": round(ratio, 4) if control else None,
            "speedups": {n: round(v, 4) for n, v in res.speedups(ref).items() if n != ref},
            "paired_speedups": {n: round(v, 4) for n, v in res.paired_speedups(ref).items() if n != ref},
            "drift": round(drift, 4),
        })
    return runs[kept][0], record


def _read_input_shape(path: Path) -> list[int | str | None]:
    """The declared shape of a file's only input (dim_param → its name, unknown → None).

    Raises:
        BadInput: missing, unreadable or non-ONNX file, or a model with other than one input.
    """
    import onnx

    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file; give .onnx files")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...
        raise BadInput(f"{path}: not a readable ONNX model ({type(exc).__name__}); give .onnx files") from exc
    # Protobuf parses many byte strings (an empty file, say) into an empty ModelProto.
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise BadInput(f"{path}: not an ONNX model (no graph); give .onnx files")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BadInput(f"{path}: the model has {len(inputs)} inputs; bench supports single-input models")
    tensor_type = inputs[0].type.tensor_type
    if not tensor_type.HasField("shape"):
        raise BadInput(f"{path}: the input has no declared shape; pass {opt('input_shape')}")
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def bench_files(
    paths: Sequence[Path],
    input_shape: tuple[int, ...] | None = None,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    iters: int = 100,
    warmup: int = 10,
    block: int = 10,
    drop: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> BenchResult:
    """Benchmark ONNX files against each other (``deploy-prune bench A.onnx B.onnx``).

    Variants are named after the file stems (the full path where stems repeat). Without ``input_shape`` it
    is read from the models: static dimensions as declared, dynamic ones (e.g. ``batch``) set to 1.

    Args:
        paths: the files, the first being the baseline by convention.
        input_shape: the benchmark input's shape; ``None`` to infer it.
        provider, threads, iters, warmup, block, drop, seed, progress: as in :func:`benchmark`.

    Returns:
        The :class:`BenchResult`.

    Raises:
        BadInput: no files; a missing, unreadable or non-ONNX file; models whose inputs differ; an input
            shape a model does not accept; a model ONNX Runtime cannot load.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise BadInput("nothing to benchmark: give at least one .onnx file")
    shapes = {p: _read_input_shape(p) for p in paths}

    first = paths[0]
    if input_shape is None:
        for p in paths[1:]:
            a, b = shapes[first], shapes[p]
            clash = len(a) != len(b) or any(
                isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b)
            )
            if clash:
                raise BadInput(
                    f"input shapes differ: {first} takes {_fmt_shape(a)}, {p} takes {_fmt_shape(b)}; "
                    "bench compares models that take the same input"
                )
        # A static size declared by any model wins over another's dynamic dim; still-dynamic dims become 1.
        input_shape = tuple(
            next((s[i] for s in shapes.values() if isinstance(s[i], int)), 1) for i in range(len(shapes[first]))
        )
    else:
        input_shape = tuple(int(d) for d in input_shape)
        for p in paths:
            _check_shape(shapes[p], input_shape, str(p))

    names: dict[str, Path] = {}
    stems = [p.stem for p in paths]
    for p in paths:
        name = p.stem if stems.count(p.stem) == 1 else str(p)
        while name in names:  # the same file given twice
            name += "'"
        names[name] = p
    try:
        return benchmark(
            names,
            input_shape,
            provider=provider,
            threads=threads,
            iters=iters,
            warmup=warmup,
            block=block,
            drop=drop,
            seed=seed,
            progress=progress,
        )
    except BadInput:
        raise
    except DeployPruneError as exc:  # for user-supplied files, "ORT cannot load it" is the user's to fix
        raise BadInput(exc.raw) from exc

