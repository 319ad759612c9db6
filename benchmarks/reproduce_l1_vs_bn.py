"""Is filter L1 informative in builtin:mnist_cnn (BN after every conv)? (docs/reproduction.md, sensitivity)

Run: python benchmarks/reproduce_l1_vs_bn.py
"""
# Is filter L1 informative in mnist_cnn (BN after every conv)? Spearman rank correlation per layer between a
# filter's L1 norm and (a) its channel's mean |post-BN activation| on the 1,000 validation digits, (b) |gamma|/sigma.
import torch
torch.set_num_threads(1)
from deploy_prune.reproduce.common import make_context, baseline_cnn
ctx = make_context(True, 1)
m = baseline_cnn(ctx).eval()
def rank(v): return torch.argsort(torch.argsort(v)).double()
def spearman(a, b):
    ra, rb = rank(a), rank(b); ra -= ra.mean(); rb -= rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
acts = {}
convs = [(i, m[i], m[i + 1]) for i in range(len(m)) if isinstance(m[i], torch.nn.Conv2d)]
hooks = [bn.register_forward_hook(lambda mod, inp, out, k=i: acts.setdefault(k, []).append(out.abs().mean((0, 2, 3))))
         for i, _, bn in convs]
with torch.no_grad():
    for x, _ in ctx.data.val: m(x)
for i, conv, bn in convs:
    l1 = conv.weight.abs().sum((1, 2, 3))
    act = torch.stack(acts[i]).mean(0)
    eff = bn.weight.abs() / (bn.running_var + bn.eps).sqrt()
    print(f"layer {i}: filters {conv.out_channels}, spearman(L1, mean |BN out|) = {spearman(l1, act):+.2f}, "
          f"spearman(L1, |gamma|/sigma) = {spearman(l1, eff):+.2f}, spearman(L1 * |gamma|/sigma, mean |BN out|) = "
          f"{spearman(l1 * eff, act):+.2f}")
