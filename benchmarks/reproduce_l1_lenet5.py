"""Li et al.'s smallest-L1 vs random vs largest-L1 sweep on a network without BatchNorm (docs/reproduction.md).

builtin:lenet5 trained 8 epochs (Adam 1e-3, seed 0) on mnist5k, then each layer pruned alone at 25/50/75/90%
without retraining, by the product's sensitivity sweep. Run: python benchmarks/reproduce_l1_lenet5.py
"""

import torch

from deploy_prune.reproduce.common import SHAPE, builtin, make_context
from deploy_prune.reproduce.sensitivity import LargestL1
from deploy_prune.sensitivity import sensitivity
from deploy_prune.train import train

torch.set_num_threads(1)
ctx = make_context(True, 1)
model = builtin("lenet5", 0)
train(model, ctx.data.train, epochs=8, lr=1e-3, optimizer="adam", seed=0, progress=False)
fr = (0.25, 0.5, 0.75, 0.9)
res = {n: sensitivity(model, ctx.data, SHAPE, criterion=c, fractions=fr, progress=False)
       for n, c in (("smallest_l1", "l1"), ("random", "random"), ("largest_l1", LargestL1()))}
print(f"baseline {res['smallest_l1']['baseline']:.2f}")
print("| layer | fraction | smallest L1 | random | largest L1 |\n|---|---|---|---|---|")
means = {n: [] for n in res}
for layer in res["smallest_l1"]["layers"]:
    for i, f in enumerate(fr):
        accs = {n: res[n]["layers"][layer]["accuracy"][i] for n in res}
        for n in res:
            means[n].append(accs[n])
        print(f"| {layer} | {f} | {accs['smallest_l1']:.1f} | {accs['random']:.1f} | {accs['largest_l1']:.1f} |")
print("mean", {n: round(sum(v) / len(v), 2) for n, v in means.items()})
