"""Provider resolution, sessions and the interleaved benchmark on tiny ONNX models built with onnx.helper.

No timing is asserted: only the protocol (sample counts, ordering of statistics, what is recorded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploy_prune.bench import (
    CPU,
    MAX_ITERS,
    BenchResult,
    LatencyStats,
    bench_files,
    benchmark,
    benchmark_controlled,
    make_session,
    resolve_provider,
)
from deploy_prune.errors import BadInput

CUDA_HERE = torch.cuda.is_available()


def conv_model(path: Path, channels: int, *, batch: int | str = "batch", hw: int = 16) -> Path:
    """Conv(3→C)-Relu-Conv(C→C)-Relu-GlobalAveragePool, written at IR 10 / opset 18."""
    rng = np.random.default_rng(channels)
    w1 = numpy_helper.from_array(0.3 * rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(0.1 * rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"conv{channels}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, channels, 1, 1])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench")
    return {
        "dense": conv_model(d / "dense.onnx", 16),
        "structured": conv_model(d / "structured.onnx", 8),
        "big": conv_model(d / "big.onnx", 8, hw=32),
        "static4": conv_model(d / "static4.onnx", 8, batch=4),
    }


# ----------------------------------------------------------------------------------------------------------
# providers and sessions


def test_resolve_provider_cpu_and_auto() -> None:
    assert resolve_provider("cpu") == CPU
    assert resolve_provider("CPUExecutionProvider") == CPU
    expected = "CUDAExecutionProvider" if CUDA_HERE else CPU
    assert resolve_provider("auto") == expected


@pytest.mark.skipif(CUDA_HERE, reason="CUDA really runs on this machine")
def test_resolve_provider_cuda_without_gpu_is_bad_input() -> None:
    # onnxruntime-gpu advertises CUDA here, but a session would silently run on CPU.
    with pytest.raises(BadInput, match=r"CUDA execution provider cannot run here \(.+\): use provider cpu or auto") as err:
        resolve_provider("cuda")
    assert "use --provider cpu or auto" in err.value.cli_message()


def test_resolve_provider_unknown_name() -> None:
    with pytest.raises(BadInput, match="choose auto, cpu or cuda"):
        resolve_provider("tpu")


def test_make_session_options(models: dict[str, Path]) -> None:
    session = make_session(models["dense"], "cpu", threads=1)
    assert session.get_providers()[0] == CPU
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_make_session_can_profile_each_kernel(models: dict[str, Path], tmp_path: Path) -> None:
    import json

    session = make_session(models["dense"], "cpu", threads=1, profile_prefix=str(tmp_path / "prof"))
    x = np.zeros([d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape], dtype=np.float32)
    for _ in range(3):
        session.run(None, {session.get_inputs()[0].name: x})
    path = Path(session.end_profiling())
    assert path.parent == tmp_path and path.name.startswith("prof")
    kernels = [e for e in json.loads(path.read_text()) if e.get("cat") == "Node"
               and e["name"].endswith("_kernel_time")]
    assert kernels and all(e["dur"] >= 0 and e["args"]["op_name"] for e in kernels)
    assert not make_session(models["dense"], "cpu", threads=1).get_session_options().enable_profiling


def test_make_session_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such ONNX file"):
        make_session(tmp_path / "nope.onnx", "cpu")


# ----------------------------------------------------------------------------------------------------------
# statistics and the benchmark


def test_latency_stats_from_known_samples() -> None:
    stats = LatencyStats.from_samples([float(v) for v in range(1, 101)])
    assert (stats.min, stats.p50, stats.n) == (1.0, 50.5, 100)
    assert stats.p90 == pytest.approx(90.1) and stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5)
    assert set(stats.to_dict()) == {"p50", "p90", "p99", "mean", "std", "min", "n"}


def test_benchmark_protocol(models: dict[str, Path]) -> None:
    result = benchmark(
        {"dense": models["dense"], "structured": models["structured"]},
        (1, 3, 16, 16),
        iters=13,  # not a multiple of block - drop: the last round is partial
        warmup=2,
        block=4,
        drop=1,
        threads=1,
        progress=False,
    )
    assert isinstance(result, BenchResult)
    assert result.provider == CPU
    assert result.threads == 1
    assert set(result.stats) == set(result.samples) == {"dense", "structured"}
    for name, stats in result.stats.items():
        assert stats.n == 13 == len(result.samples[name])
        assert stats.min <= stats.p50 <= stats.p90 <= stats.p99
        assert stats.min > 0 and stats.std >= 0
    assert "blocks of 4" in result.method and "spinning off" in result.method
    sp = result.speedups("dense")
    assert sp["structured"] == pytest.approx(result.stats["dense"].p50 / result.stats["structured"].p50)
    assert result.to_dict()["latency_ms"]["structured"]["n"] == 13


def test_min_seconds_raises_the_iterations_of_fast_models_alike_for_every_variant(models: dict[str, Path]) -> None:
    pair = {"dense": models["dense"], "structured": models["structured"]}
    exact = benchmark(pair, (1, 3, 16, 16), iters=7, warmup=3, threads=1, progress=False)
    assert exact.iters == 7 and all(len(s) == 7 for s in exact.samples.values())
    # a 16x16 conv runs in well under 10 ms, so timing it for 0.1 s takes more than 10 runs; never above the cap
    raised = benchmark(pair, (1, 3, 16, 16), iters=7, warmup=3, threads=1, progress=False, min_seconds=0.1)
    assert 10 < raised.iters <= MAX_ITERS
    assert all(len(s) == raised.iters for s in raised.samples.values())
    assert f"until each had {raised.iters} kept runs" in raised.method
    # without warm-up runs there is nothing to estimate the speed from: exactly iters
    assert benchmark(pair, (1, 3, 16, 16), iters=7, warmup=0, threads=1, progress=False, min_seconds=0.1).iters == 7


def test_total_seconds_raises_the_iterations_until_the_whole_run_lasts_that_long(models: dict[str, Path]) -> None:
    pair = {"dense": models["dense"], "structured": models["structured"]}
    res = benchmark(pair, (1, 3, 16, 16), iters=7, warmup=3, block=5, drop=1, threads=1, progress=False,
                    total_seconds=0.3)
    assert 7 < res.iters <= MAX_ITERS and all(len(s) == res.iters for s in res.samples.values())
    # the floor is the whole run (both variants, dropped runs included), not each variant
    timed_ms = sum(sum(s) for s in res.samples.values()) * 5 / 4
    assert timed_ms > 0.3e3 / 4  # about 0.3 s at the warm-up's speed; the timed runs are usually faster


def test_a_control_pair_that_agrees_keeps_the_first_run(models: dict[str, Path]) -> None:
    # the same file twice is a perfect control pair; with a tolerance of 100% any run passes
    files = {"dense": models["dense"], "copy": models["dense"], "structured": models["structured"]}
    said: list[str] = []
    res, record = benchmark_controlled(files, (1, 3, 16, 16), ("dense", "copy"), tolerance=1.0, say=said.append,
                                       iters=5, warmup=1, threads=1, progress=False)
    assert record["pair"] == ["dense", "copy"] and record["tolerance"] == 1.0
    assert len(record["runs"]) == 1 and record["kept"] == 0 and not said
    run = record["runs"][0]
    assert run["control_ratio"] == pytest.approx(res.stats["copy"].p50 / res.stats["dense"].p50, abs=1e-4)
    assert run["speedups"]["structured"] == pytest.approx(res.stats["dense"].p50 / res.stats["structured"].p50,
                                                          abs=1e-4)
    assert "dense" not in run["speedups"]


def test_a_control_pair_that_disagrees_times_again_and_keeps_the_run_where_it_agrees_best(
        models: dict[str, Path]) -> None:
    # a tolerance of 0 is never met by two measured p50s (nanosecond timings), so every attempt runs
    said: list[str] = []
    files = {"small": models["structured"], "dense": models["dense"]}
    res, record = benchmark_controlled(files, (1, 3, 16, 16), ("dense", "small"), tolerance=0.0, attempts=3,
                                       say=said.append, iters=5, warmup=1, threads=1, progress=False)
    ratios = [r["control_ratio"] for r in record["runs"]]
    assert len(ratios) == 3 and len(said) == 2 and "run 2 of at most 3" in said[0]
    # kept: the run whose worse check (control pair, or the speedup read two ways) is smallest
    worse = [max(abs(np.log(r["control_ratio"])), r["drift"]) for r in record["runs"]]
    assert worse[record["kept"]] == pytest.approx(min(worse), abs=2e-4)
    # the result returned is the kept run's
    assert res.stats["small"].p50 / res.stats["dense"].p50 == pytest.approx(ratios[record["kept"]], abs=1e-4)
    with pytest.raises(KeyError, match="control pair"):
        benchmark_controlled(files, (1, 3, 16, 16), ("dense", "absent"), iters=2, threads=1, progress=False)


def _two_state_run(switch_mid_block: bool) -> BenchResult:
    """Ten rounds (block 10, drop 2: 8 kept runs per variant and round) of a 10 ms dense model and a model 3.33x
    faster, on a machine 25% slower in its slow state, which holds the last five rounds. With
    ``switch_mid_block``, the switch catches dense's first run of round 5 still fast and the pruned model's last
    run of round 4 already slow: 41 of dense's 80 runs fast, 39 of the pruned model's."""
    dense = [10.0] * 40 + [12.5] * 40
    small = [3.0] * 40 + [3.75] * 40
    if switch_mid_block:
        dense[40] = 10.0
        small[39] = 3.75
    samples = {"dense": dense, "small": small}
    return BenchResult(stats={n: LatencyStats.from_samples(v) for n, v in samples.items()}, samples=samples,
                       provider=CPU, threads=1, method="", iters=80, block=10, drop=2)


def test_speedups_read_round_by_round_see_through_a_machine_that_changed_speed() -> None:
    steady = _two_state_run(switch_mid_block=False)
    assert steady.speedups("dense")["small"] == pytest.approx(10 / 3)  # half and half: both p50s midway alike
    assert steady.paired_speedups("dense")["small"] == pytest.approx(10 / 3)
    assert steady.drift("dense") == pytest.approx(0.0, abs=1e-12)
    switched = _two_state_run(switch_mid_block=True)
    # dense's p50 is a fast run (10 ms), the pruned model's a slow one (3.75 ms): 2.67x from the p50s
    assert switched.speedups("dense")["small"] == pytest.approx(10 / 3.75)
    # every round, whichever state it ran in, is 3.33x (a round's one odd run does not move its block median)
    assert switched.paired_speedups("dense")["small"] == pytest.approx(10 / 3)
    assert switched.drift("dense") == pytest.approx(np.log((10 / 3) / (10 / 3.75)))
    assert switched.drifts("dense") == {"small": pytest.approx(np.log((10 / 3) / (10 / 3.75)))}
    assert switched.paired_speedups("dense")["dense"] == 1.0
    # a gap that the rounds' own spread explains does not count: two identical models, the second's blocks
    # alternately 15% fast and slow (long rounds on a drifting machine), read 1.00x from the p50s and 1.023x
    # round by round (the median of ten ratios, five 1/0.85 and five 1/1.15)
    noisy_samples = {"dense": [10.0] * 80, "twin": sum(([8.5] * 8 if i % 2 else [11.5] * 8 for i in range(10)), [])}
    noisy = BenchResult(stats={n: LatencyStats.from_samples(v) for n, v in noisy_samples.items()},
                        samples=noisy_samples, provider=CPU, threads=1, method="", iters=80, block=10, drop=2)
    assert noisy.speedups("dense")["twin"] == pytest.approx(1.0)
    assert noisy.paired_speedups("dense")["twin"] == pytest.approx((1 / 0.85 + 1 / 1.15) / 2)
    assert noisy.drift("dense") == 0.0
    # without the round structure there is nothing to pair: the p50s' ratio
    flat = BenchResult(stats=switched.stats, samples=switched.samples, provider=CPU, threads=1, method="")
    assert flat.paired_speedups("dense") == flat.speedups("dense") and flat.drift("dense") == 0.0


def test_without_a_control_pair_the_speedups_are_still_checked_both_ways(models: dict[str, Path]) -> None:
    files = {"dense": models["dense"], "structured": models["structured"]}
    res, record = benchmark_controlled(files, (1, 3, 16, 16), None, reference="dense", tolerance=1.0, iters=16,
                                       warmup=1, block=5, drop=1, threads=1, progress=False)
    assert record["pair"] is None and len(record["runs"]) == 1 and record["kept"] == 0
    run = record["runs"][0]
    assert run["control_ratio"] is None and set(run["speedups"]) == set(run["paired_speedups"]) == {"structured"}
    assert run["paired_speedups"]["structured"] == pytest.approx(res.paired_speedups("dense")["structured"],
                                                                 abs=1e-4)
    with pytest.raises(KeyError, match="reference"):
        benchmark_controlled(files, (1, 3, 16, 16), None, reference="absent", iters=2, threads=1, progress=False)
    with pytest.raises(BadInput, match="nothing to benchmark"):
        benchmark_controlled({}, (1, 3, 16, 16), None, iters=2, threads=1, progress=False)


def test_benchmark_rejects_bad_settings(models: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="block > drop"):
        benchmark({"dense": models["dense"]}, (1, 3, 16, 16), block=2, drop=2, progress=False)
    with pytest.raises(BadInput, match="iters >= 1"):
        benchmark({"dense": models["dense"]}, (1, 3, 16, 16), iters=0, progress=False)


def test_benchmark_rejects_shape_the_model_cannot_take(models: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="pass a matching input_shape") as err:
        benchmark({"dense": models["dense"]}, (1, 3, 32, 32), iters=1, progress=False)
    assert err.value.cli_message().endswith("pass a matching --input-shape")


# ----------------------------------------------------------------------------------------------------------
# bench_files


def test_bench_files_infers_shape_and_names(models: dict[str, Path]) -> None:
    result = bench_files([models["dense"], models["structured"]], iters=3, warmup=1, block=3, drop=0, progress=False)
    assert result.input_shape == (1, 3, 16, 16)  # the dynamic batch becomes 1
    assert list(result.stats) == ["dense", "structured"]


def test_bench_files_takes_static_batch_from_any_model(models: dict[str, Path]) -> None:
    result = bench_files([models["structured"], models["static4"]], iters=2, warmup=0, block=2, drop=0, progress=False)
    assert result.input_shape == (4, 3, 16, 16)


def test_bench_files_rejects_bad_files(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        bench_files([models["dense"], tmp_path / "missing.onnx"], progress=False)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(BadInput, match="notes.onnx: not"):
        bench_files([text], progress=False)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="not an ONNX model"):
        bench_files([empty], progress=False)
    with pytest.raises(BadInput, match="not a file"):
        bench_files([tmp_path], progress=False)


def test_bench_files_rejects_different_input_shapes(models: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="input shapes differ"):
        bench_files([models["dense"], models["big"]], progress=False)
    with pytest.raises(BadInput, match="input_shape") as err:
        bench_files([models["static4"]], (1, 3, 16, 16), progress=False)
    assert "--input-shape" in err.value.cli_message()
