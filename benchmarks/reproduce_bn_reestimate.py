"""Stale vs re-estimated BatchNorm statistics after pruning one layer of builtin:mnist_cnn (docs/reproduction.md).

Run: python benchmarks/reproduce_bn_reestimate.py
"""
import copy, torch
torch.set_num_threads(1)
from deploy_prune.reproduce.common import make_context, baseline_cnn, SHAPE
from deploy_prune import criteria
from deploy_prune.surgery import PlanConfig, analyze, select, prune_channels
from deploy_prune.train import evaluate
ctx = make_context(True, 1)
m = baseline_cnn(ctx)
print("base", evaluate(m, ctx.data.val))
for layer, f in (("0", 0.2), ("3", 0.2), ("7", 0.4)):
    w = copy.deepcopy(m); g = analyze(w, SHAPE)
    plan = select(g, criteria.create("l1"), PlanConfig(ratio=0.0, max_layer_ratio=1.0, layer_ratios={layer: f}))
    prune_channels(w, g, plan)
    a0 = evaluate(w, ctx.data.val)
    for mod in w.modules():
        if isinstance(mod, torch.nn.BatchNorm2d): mod.reset_running_stats(); mod.momentum = None
    w.train()
    with torch.no_grad():
        for i, (x, y) in enumerate(ctx.data.train):
            if i >= 20: break
            w(x)
    print(layer, f, a0, "after BN recalibration", evaluate(w, ctx.data.val))
