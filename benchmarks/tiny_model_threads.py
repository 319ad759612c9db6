"""Threads and spinning for a sub-millisecond model: two ONNX files timed side by side, three session settings.

For each setting (2 threads spinning off, deploy-prune's default; 2 threads spinning on; 1 thread) both files
are timed in interleaved blocks (``--blocks`` blocks of 10 runs each per file, the first 2 of each block
dropped, as deploy-prune's benchmark does), and the medians, the speedup and the per-block medians of the
second file are printed, so bimodal timings show. Example, on a digits bundle::

    deploy-prune run builtin:mnist_cnn --ratio 0.5 --no-finetune --out /tmp/digits
    python benchmarks/tiny_model_threads.py /tmp/digits/dense.onnx /tmp/digits/model.onnx

docs/onnx-runtime.md §7 records what it measured.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort


def session(path: str, threads: int, spin: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--blocks", type=int, default=40)
    args = ap.parse_args()
    for threads, spin in ((2, "0"), (2, "1"), (1, "0")):
        sessions = {"first": session(args.first, threads, spin), "second": session(args.second, threads, spin)}
        feeds = {}
        for k, s in sessions.items():
            inp = s.get_inputs()[0]
            shape = [d if isinstance(d, int) else 1 for d in inp.shape]
            feeds[k] = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.blocks):
            for k, s in sessions.items():
                for i in range(10):
                    t0 = time.perf_counter()
                    s.run(None, feeds[k])
                    if i >= 2:
                        times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        blocks = [round(float(np.median(times["second"][j:j + 8])), 3) for j in range(0, len(times["second"]), 8)]
        print(f"threads {threads}, spinning {'on' if spin == '1' else 'off'}: first {med['first']:.4f} ms, "
              f"second {med['second']:.4f} ms, speedup {med['first'] / med['second']:.2f}x; second's block "
              f"medians {min(blocks)}-{max(blocks)} ms: {blocks}")


if __name__ == "__main__":
    main()
