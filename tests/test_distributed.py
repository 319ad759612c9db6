"""Data-parallel runs: torchrun with 2 CPU ranks (gloo) on a tiny model and data, and the collective helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.multiprocessing as mp

from _tiny import tiny_digits  # noqa: F401 - the fixture

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "deploy_prune" / "report.schema.json").read_text())
TINY = ["--input-shape", "1x1x28x28", "--batch-size", "16", "--bench-iters", "3", "--bench-target-seconds", "1", "-q"]


def _torchrun(args: list[str], tmp: Path, nproc: int = 2, timeout: int = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "deploy_prune", *args]
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=tmp, env=full, capture_output=True, text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_two_ranks_prune_alike_train_together_and_only_rank_0_writes(tmp_path: Path, tiny_digits: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    trace = tmp_path / "trace"
    out = work / "bundle"
    res = _torchrun(["run", "builtin:mnist_cnn", "--data", f"imagefolder:{tiny_digits}", "--epochs", "2",
                     "--out", str(out), *TINY], work, env={"DEPLOY_PRUNE_TRACE": str(trace)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert not _errors(res.stderr)
    ranks = [json.loads((trace / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # both ranks confirmed the same plan digest, and it is the plan in the bundle
    assert ranks[0]["checked"] and ranks[0]["checked"] == ranks[1]["checked"]
    report = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    assert report["environment"]["world_size"] == 2
    from deploy_prune.spec import PrunePlan

    pruned = torch.load(out / "pruned.pt", weights_only=True)
    assert PrunePlan.from_json(pruned["plan"]).digest() == ranks[0]["checked"][0][1]
    # every training run really trained on both ranks, with the same all-reduced (global) losses, which fall
    for r in ranks:
        assert [t["desc"] for t in r["training"]] == ["finetune structured (step 1/1)", "finetune unstructured"]
        for t in r["training"]:
            assert t["trained"] == 2 and t["losses"][-1] < t["losses"][0]
    assert [t["losses"] for t in ranks[0]["training"]] == [t["losses"] for t in ranks[1]["training"]]
    # only the bundle was written: no staging folder, no second bundle, no lock
    assert sorted(p.name for p in work.iterdir()) == ["bundle"]


def test_a_bad_option_under_torchrun_is_one_error_line(tmp_path: Path) -> None:
    res = _torchrun(["run", "builtin:mnist_cnn", "--sync-bn", "--no-finetune", "--out", str(tmp_path / "b"),
                     *TINY], tmp_path)
    assert res.returncode != 0
    errors = _errors(res.stderr)
    assert len(errors) == 1 and "--sync-bn needs CUDA" in errors[0], res.stderr[-2000:]
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()


@pytest.mark.slow
def test_a_failure_on_rank_0_alone_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    # the latency search runs on rank 0 only (rank 1 waits for its result): an unreachable target fails there
    res = _torchrun(["run", "builtin:mnist_cnn", "--no-finetune", "--target-speedup", "50",
                     "--out", str(tmp_path / "b"), *TINY], tmp_path)
    assert res.returncode != 0
    errors = _errors(res.stderr)
    assert len(errors) == 1 and "speedup" in errors[0], res.stderr[-2000:]
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()


# ----------------------------------------------------------------------------------------------------------
# the collective helpers, on 2 processes joined with gloo


def _helpers_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    from deploy_prune import distributed
    from deploy_prune.spec import PrunePlan

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    result: dict = {}
    try:
        same = PrunePlan({"conv": 4}, {"conv": [0, 2]})
        distributed.check_same_plan(same, "same")
        other = PrunePlan({"conv": 4}, {"conv": [0, 2] if rank == 0 else [1, 3]})
        try:
            distributed.check_same_plan(other, "the plan of step 1")
            result["mismatch"] = None
        except distributed.PlanMismatch as exc:
            result["mismatch"] = str(exc)
        # evaluation batches: each rank its share, the same images as a single process
        data = TensorDataset(torch.arange(50).float().unsqueeze(1), torch.zeros(50, dtype=torch.long))
        loader = DataLoader(data, batch_size=8)
        result["eval"] = [int(v) for x, _ in distributed.shard_eval(loader, 5) for v in x.reshape(-1)]
        result["sum"] = distributed.sum_numbers(rank + 1.0, 10.0)
        summed = distributed.sum_tensors({"a": torch.tensor([rank, 1]), **({"b": torch.ones(2)} if rank else {})})
        result["tensors"] = {k: v.tolist() for k, v in summed.items()}
        # training shards: disjoint, together the whole set, half the batch each
        shard, sampler = distributed.shard_train(DataLoader(data, batch_size=8, shuffle=True), seed=3)
        sampler.set_epoch(0)
        result["train"] = [int(v) for x, _ in shard for v in x.reshape(-1)]
        result["train_batch"] = shard.batch_size
        # BatchNorm statistics: the average over ranks, weighted by the batches each saw
        bn = torch.nn.BatchNorm2d(2)
        bn.running_mean.fill_(float(rank))
        bn.num_batches_tracked.fill_(1 + 2 * rank)
        distributed.average_bn_statistics(torch.nn.Sequential(bn))
        result["bn_mean"] = bn.running_mean.tolist()
        result["on_main"] = distributed.on_main(lambda: f"measured on rank {distributed.rank()}")
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def test_collective_helpers_on_two_gloo_ranks(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_helpers_worker, args=(init, str(tmp_path)), nprocs=2, start_method="spawn")
    r = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]
    for i in (0, 1):
        msg = r[i]["mismatch"]
        assert msg is not None and "the plan of step 1" in msg and "rank(s) 1" in msg  # an error on both ranks
    # rank 0 reads batches 0, 2, 4 and rank 1 batches 1, 3 of the first 5: exactly images 0..39, once
    assert sorted(r[0]["eval"] + r[1]["eval"]) == list(range(40))
    assert r[0]["eval"][:8] == list(range(8)) and r[1]["eval"][:8] == list(range(8, 16))
    assert r[0]["sum"] == r[1]["sum"] == [3.0, 20.0]
    assert r[0]["tensors"] == r[1]["tensors"] == {"a": [1, 2], "b": [1.0, 1.0]}
    assert not set(r[0]["train"]) & set(r[1]["train"]) and sorted(r[0]["train"] + r[1]["train"]) == list(range(50))
    assert r[0]["train_batch"] == r[1]["train_batch"] == 4
    assert r[0]["bn_mean"] == r[1]["bn_mean"] == [0.75, 0.75]  # (0*1 + 1*3) / 4
    assert r[0]["on_main"] == r[1]["on_main"] == "measured on rank 0"
