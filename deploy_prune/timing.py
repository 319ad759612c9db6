"""Latency results, as plain data: what one benchmark run measured (no ONNX Runtime import here, so reports and
tests can read results without loading the runtime)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one variant's per-run latencies, in milliseconds (``report.json``'s ``latency_ms``)."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    n: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        """Summarize samples (ms). Percentiles are linear-interpolated, so ``min <= p50 <= p90 <= p99``.

        Raises:
            ValueError: no samples.
        """
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples")
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        std = float(a.std(ddof=1)) if a.size > 1 else 0.0
        return cls(p50=p50, p90=p90, p99=p99, mean=float(a.mean()), std=std, min=float(a.min()), n=int(a.size))

    def to_dict(self) -> dict[str, float | int]:
        """The ``latency_ms`` object of ``report.json``."""
        return asdict(self)


@dataclass
class BenchResult:
    """The outcome of one interleaved benchmark run.

    Attributes:
        stats: per variant name, its latency summary.
        samples: per variant name, the kept per-run latencies in ms, in the order they were measured.
        provider: the execution provider that really ran (``session.get_providers()[0]``).
        threads: intra-op threads per session.
        method: one sentence describing how the numbers were taken, for the report.
        onnxruntime: the onnxruntime version.
        input_shape: the benchmark input's shape.
        iters, warmup, block, drop: the protocol's parameters.
    """

    stats: dict[str, LatencyStats]
    samples: dict[str, list[float]]
    provider: str
    threads: int
    method: str
    onnxruntime: str = ""
    input_shape: tuple[int, ...] = ()
    iters: int = 0
    warmup: int = 0
    block: int = 0
    drop: int = 0

    def speedups(self, baseline: str) -> dict[str, float]:
        """Ratio of p50s, ``p50[baseline] / p50[name]``, for every variant (``> 1`` means faster).

        Raises:
            KeyError: ``baseline`` was not benchmarked.
        """
        base = self.stats[baseline].p50
        return {name: base / s.p50 for name, s in self.stats.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the raw samples)."""
        return {
            "provider": self.provider,
            "threads": self.threads,
            "method": self.method,
            "onnxruntime": self.onnxruntime,
            "input_shape": list(self.input_shape),
            "iters": self.iters,
            "warmup": self.warmup,
            "block": self.block,
            "drop": self.drop,
            "latency_ms": {name: s.to_dict() for name, s in self.stats.items()},
        }
