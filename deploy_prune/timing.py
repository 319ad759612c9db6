"""Latency results, as plain data: what one benchmark run measured (no ONNX Runtime import here, so reports and
tests can read results without loading the runtime)."""

from __future__ import annotations

import math
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

    def paired_speedups(self, baseline: str) -> dict[str, float]:
        """The median over the interleaved rounds of each round's ratio, ``p50[baseline] / p50[name]`` within the
        round (every variant's block of a round runs within a fraction of a second of the others').

        This is a check on :meth:`speedups`, not a replacement: when the machine switches between a fast and a slow
        state during a run, each variant's pooled samples mix the two states, and when about half of them fall in
        each, a pooled p50 lands in one state for one variant and in the other (or between) for the next. On a
        2-vCPU VM, EfficientNet-B0 against a pruned copy measured 2.91x from the pooled p50s (dense's p50 between
        its two modes, 9.7 and 12.1 ms; the pruned one's in its slow mode) and 3.24x round by round, 3.2-3.3x in
        either state alone (docs/onnx-runtime.md §3). Runs without the round structure (``block <= drop``) give
        :meth:`speedups`.

        Raises:
            KeyError: ``baseline`` was not benchmarked.
        """
        pooled = self.speedups(baseline)
        rounds = self._round_ratios(baseline)
        return {n: float(np.median(r)) if r.size else pooled[n] for n, r in rounds.items()}

    def _round_ratios(self, baseline: str) -> dict[str, np.ndarray]:
        """Per variant, each round's ``p50[baseline's block] / p50[its block]`` (empty without the round
        structure)."""
        per_round = self.block - self.drop
        empty = {name: np.zeros(0) for name in self.stats}
        if per_round <= 0 or len(self.samples.get(baseline, ())) < per_round:
            return empty
        base = np.asarray(self.samples[baseline], dtype=np.float64)
        rounds = base.size // per_round
        base_p50 = np.median(base[: rounds * per_round].reshape(rounds, per_round), axis=1)
        out = {}
        for name, samples in self.samples.items():
            a = np.asarray(samples, dtype=np.float64)
            n = min(rounds, a.size // per_round)
            out[name] = base_p50[:n] / np.median(a[: n * per_round].reshape(n, per_round), axis=1)
        return out

    def drifts(self, baseline: str) -> dict[str, float]:
        """Per variant but ``baseline``: how far (``|log|`` of the ratio, ~relative) :meth:`speedups` and
        :meth:`paired_speedups` disagree beyond what the rounds' own spread explains (0 at most that far apart):
        near 0 when the machine ran at one speed, large when a pooled p50 was read off a mix of its fast and slow
        states.

        The round-by-round reading is a median of the rounds' ratios, so it is itself only as sure as the rounds
        are many and steady: a gap counts only beyond two standard errors of that median (1.2533 · std /
        sqrt(rounds), of the log ratios). A ConvNeXt-T run of 60 iterations (7 rounds of a 75 ms model, rounds
        1.8 s long) had rounds 0.84-1.15x apart for two identical models, and read 0.95x for them round by round:
        noise, not a switch of the machine's speed."""
        pooled = self.speedups(baseline)
        out = {}
        for name, ratios in self._round_ratios(baseline).items():
            if name == baseline:
                continue
            if ratios.size == 0:
                out[name] = 0.0
                continue
            se = 1.2533 * float(np.std(np.log(ratios), ddof=1)) / math.sqrt(ratios.size) if ratios.size > 1 else 0.0
            out[name] = max(0.0, abs(math.log(pooled[name] / float(np.median(ratios)))) - 2 * se)
        return out

    def drift(self, baseline: str) -> float:
        """The worst variant's :meth:`drifts` (0 with no other variant)."""
        return max(self.drifts(baseline).values(), default=0.0)

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
