"""What the activation after a layer adds to its one-layer latency table (CPU provider).

Since table version 2, ``--target-speedup``'s tables time a linear layer with its bias add and the activation
the model applies to its output (GELU as the exporter writes it: Div, Erf, Add, Mul, Mul), and a conv with a
SiLU or GELU after it (ReLU fuses into the conv and was always timed). This prints, for the first ``--sites``
distinct layer configurations of a model that are followed by such an activation, the one-layer time at a few
output widths without it (a linear layer with its bias only, a conv with a fused ReLU as version 1 timed it) and with
it, timed side by side (interleaved rounds, the 25th percentile of each block, the per-call overhead
subtracted, as the tables are measured), and the ratio::

    python benchmarks/site_activation.py torchvision:convnext_tiny --input-shape 1x3x224x224
    python benchmarks/site_activation.py torchvision:efficientnet_b0 --sites 4

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
    ap.add_argument("model", help="torchvision:NAME, timm:NAME or builtin:NAME")
    ap.add_argument("--input-shape", default="1x3x224x224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sites", type=int, default=2, help="distinct layer configurations to time")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.input_shape.split("x"))
    model, _ = build_arch(args.model)
    graph = analyze(model.eval(), shape)
    timer = latency.Timer("CPUExecutionProvider", args.threads)
    seen, todo = set(), []
    for s in latency.sites(graph, shape[0]):
        if s.act and s.config() not in seen:
            seen.add(s.config())
            todo.append(s)
    print(f"{args.model} {args.input_shape}, CPU provider, {args.threads} threads, {args.rounds} rounds; "
          "median ms over rounds")
    print(f"{'layer':28s} {'input':>16s} {'act':>5s} {'outputs':>8s} {'v1':>8s} {'with act':>9s} {'ratio':>6s}")
    for s in todo[:args.sites]:
        bare = dataclasses.replace(s, act="")
        couts = [s.in_channels] if s.depthwise else sorted({max(1, s.out_channels // 4), s.out_channels // 2,
                                                             s.out_channels})
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):  # side by side: every variant once per round
            for variant in (bare, s):
                for c in couts:
                    times.setdefault((variant.act, c), []).append(timer.site(variant, s.in_channels, c))
        for c in couts:
            a, b = statistics.median(times[("", c)]), statistics.median(times[(s.act, c)])
            print(f"{s.name:28s} {'x'.join(map(str, s.in_shape)):>16s} {s.act:>5s} {c:8d} {a:8.3f} {b:9.3f} "
                  f"{b / a if a else float('nan'):6.2f}")


if __name__ == "__main__":
    main()
