"""Halving a grouped conv: narrower groups or fewer groups, on ONNX Runtime (CPU provider).

A grouped conv (RegNet, ResNeXt) can lose channels two ways and stay valid: every group loses the same relative
positions (the group count is kept, each group gets narrower: what Torch-Pruning does), or whole groups go (each
group keeps its width, the group count drops: what deploy-prune does for groups of at most 16 channels). This
times, for every distinct grouped conv of a model, the dense layer and both halvings side by side (interleaved
rounds of the one-layer models the latency tables time, the per-call overhead subtracted), and prints the
milliseconds, the MACs and the time per MAC::

    python benchmarks/grouped_conv.py torchvision:regnet_x_400mf
    python benchmarks/grouped_conv.py torchvision:resnext50_32x4d --input-shape 1x3x224x224

docs/latency-target-log.md records what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from deploy_prune import latency
from deploy_prune.loading import build_arch
from deploy_prune.surgery import analyze


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="torchvision:regnet_x_400mf",
                    help="torchvision:NAME, timm:NAME or builtin:NAME (default: torchvision:regnet_x_400mf)")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    model, _ = build_arch(args.model)
    # positions everywhere, so that every grouped conv shows up with its dense group count
    graph = analyze(model.eval(), shape, whole_groups_up_to=0)
    timer = latency.Timer("CPUExecutionProvider", args.threads)
    seen, todo = set(), []
    for s in latency.sites(graph, shape[0]):
        if s.op == "conv" and s.groups > 1 and not s.depthwise and s.config() not in seen:
            seen.add(s.config())
            todo.append(s)
    print(f"{args.model} {args.input_shape}, CPU provider, {args.threads} threads, {args.rounds} rounds; "
          "median ms over rounds; MACs of one call")
    print(f"{'layer':22s} {'input':>14s} {'variant':>22s} {'ms':>7s} {'MMACs':>7s} {'ms/GMAC':>8s} {'x dense ms':>10s}")
    for s in todo:
        width = s.in_channels // s.groups
        half_groups = max(1, s.groups // 2)
        variants = {
            f"dense {s.groups}x{width}": (dataclasses.replace(s, group_width=0), s.in_channels, s.groups),
            f"positions {s.groups}x{max(1, width // 2)}": (dataclasses.replace(s, group_width=0),
                                                          s.groups * max(1, width // 2), s.groups),
            f"whole {half_groups}x{width}": (dataclasses.replace(s, group_width=width), half_groups * width,
                                             half_groups),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):  # side by side: every variant once per round
            for k, (site, c, _) in variants.items():
                times[k].append(timer.site(site, c, c))
        dense_ms = statistics.median(times[next(iter(variants))])
        for k, (site, c, groups) in variants.items():
            ms = statistics.median(times[k])
            macs = dataclasses.replace(site, in_shape=(s.in_shape[0], c, *s.in_shape[2:]), out_channels=c,
                                       groups=groups).macs()
            print(f"{s.name:22s} {'x'.join(map(str, s.in_shape)):>14s} {k:>22s} {ms:7.3f} {macs / 1e6:7.2f} "
                  f"{ms / macs * 1e9:8.1f} {ms / dense_ms:10.2f}")


if __name__ == "__main__":
    main()
