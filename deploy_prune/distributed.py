"""Data-parallel training under PyTorch's own ``torchrun`` and ``DistributedDataParallel`` (DDP).

``torchrun --nproc-per-node N -m deploy_prune run MODEL ...`` starts N copies of the same command. Each copy
(a *rank*) calls :func:`init` once; from then on:

* **Pruning is identical on every rank.** Every rank loads the same model and data, runs the same analysis and
  computes its plan; :func:`check_same_plan` compares the plan's digest with rank 0's and raises a clear
  error on a mismatch instead of letting DDP hang on parameters of different shapes. Surgery happens on the
  plain module, *before* any DDP wrap (DDP must never see its parameters change).
* **Training is data-parallel.** :func:`data_parallel` wraps a model for one training run, in the order the
  DDP documentation asks for: (optionally) ``SyncBatchNorm`` → move to the rank's device → the optimizer is
  built by the caller on the plain module → ``DistributedDataParallel``. When the run ends the module is
  unwrapped, ``SyncBatchNorm`` layers are turned back into the original BatchNorms and the module goes back to
  the CPU, so surgery, export and evaluation see a plain model. :func:`shard_train` gives each rank its shard of
  the training set through a ``DistributedSampler`` (``set_epoch`` every epoch); the run's ``batch_size`` is the
  *global* batch, split over the ranks, so a 2-rank run takes the same number of optimizer steps per epoch, on
  the same global batch, as a single process.
* **Statistics that choose channels are all-reduced.** Evaluation (accuracies, sensitivity sweeps), APoZ zero
  counts and BatchNorm re-estimation split the batches over the ranks (:func:`shard_eval`) and sum the counts
  (:func:`sum_tensors`, :func:`sum_numbers`, :func:`average_bn_statistics`); the result equals the
  single-process one because each of those statistics is a sum over images.
* **Rank 0 alone writes.** Other ranks wait for rank 0's outcome (:func:`wait_for_main`) and exit with its
  code; anything measured (latency targets, ``round_to auto``) runs on rank 0 and is broadcast
  (:func:`on_main`).
* **Failures never hang.** The process group has a timeout (``DEPLOY_PRUNE_DIST_TIMEOUT`` seconds, default
  1800); the first rank that fails claims the error in the rendezvous store (:func:`claim_error`), prints the
  one ``error:`` line and exits; the others exit quietly with the same code when their next collective fails
  (gloo notices the closed connection at once) or when torchrun stops them.

Backend: ``nccl`` when CUDA is available (each rank trains on ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op and training is single-process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from deploy_prune.errors import BadInput, DeployPruneError

T = TypeVar("T")

TIMEOUT_ENV = "DEPLOY_PRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_KEY = "deploy_prune/"
_STATE: dict[str, Any] = {"sync_bn": False, "device": None, "alone": False}


class PlanMismatch(DeployPruneError):
    """Two ranks decided different pruning plans (exit 1: a bug or a non-deterministic criterion)."""


# ----------------------------------------------------------------------------------------------------------
# the process group


def launched() -> bool:
    """True in a process started by torchrun with more than one rank (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """True once :func:`init` (or the caller) set up a process group of more than one rank, except inside
    :func:`alone` (rank 0 working by itself: nothing there may wait for the other ranks)."""
    return (not _STATE["alone"] and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within the block this rank works by itself: evaluation, counting and checks are local (rank 0 exporting,
    benchmarking or measuring while the other ranks wait)."""
    before = _STATE["alone"]
    _STATE["alone"] = True
    try:
        yield
    finally:
        _STATE["alone"] = before


def world_size() -> int:
    """The number of data-parallel processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the rank that measures, exports and writes (and in every single-process run)."""
    return rank() == 0


def timeout_s() -> float:
    """The process group's timeout: ``DEPLOY_PRUNE_DIST_TIMEOUT`` seconds, default 1800."""
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise BadInput(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def init(*, sync_bn: bool = False, backend: str | None = None) -> bool:
    """Join torchrun's process group when launched with more than one rank; return whether it did.

    Args:
        sync_bn: convert BatchNorms to ``SyncBatchNorm`` while training (CUDA only: PyTorch's SyncBatchNorm
            refuses CPU tensors).
        backend: ``nccl`` / ``gloo``; default ``nccl`` when CUDA is available, else ``gloo``.

    Raises:
        BadInput: ``sync_bn`` without CUDA, or a bad timeout.
    """
    _STATE["sync_bn"] = False
    if not launched():
        if sync_bn:
            raise BadInput("--sync-bn only applies to data-parallel runs: start the run with torchrun "
                           "--nproc-per-node N -m deploy_prune run ... (or drop --sync-bn)")
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if sync_bn and backend != "nccl":
        raise BadInput("--sync-bn needs CUDA (PyTorch's SyncBatchNorm only runs on GPUs); drop --sync-bn on CPU")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()), **kwargs)
    _STATE["sync_bn"] = bool(sync_bn)
    _STATE["device"] = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                        if dist.get_backend() == "nccl" else torch.device("cpu"))
    return True


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["device"] = None


def device() -> torch.device | None:
    """The device this rank trains on (``cuda:LOCAL_RANK`` with nccl, the CPU with gloo; None when not active)."""
    return _STATE["device"] if active() else None


def _store() -> Any | None:
    try:
        return dist.distributed_c10d._get_default_store()  # noqa: SLF001 - the rendezvous store torchrun made
    except Exception:  # noqa: BLE001 - no group, or the store is gone
        return None


# ----------------------------------------------------------------------------------------------------------
# collectives


def _on_device(t: torch.Tensor) -> torch.Tensor:
    d = device()
    return t.to(d) if d is not None and d.type != "cpu" else t.clone()


def sum_tensors(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum per-key tensors over all ranks; a key a rank lacks (it saw no batch) counts as zeros.

    Returns the same dict unchanged when not distributed.
    """
    if not active():
        return values
    shapes: list[Any] = [None] * world_size()
    dist.all_gather_object(shapes, {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in values.items()})
    merged: dict[str, tuple[tuple[int, ...], str]] = {}
    for s in shapes:
        merged.update(s)
    out = {}
    for k in sorted(merged):
        shape, dtype = merged[k]
        t = values[k] if k in values else torch.zeros(shape, dtype=getattr(torch, dtype))
        t = _on_device(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[k] = t.cpu()
    return out


def sum_numbers(*xs: float) -> tuple[float, ...]:
    """Sum each number over all ranks (float64); identity when not distributed."""
    if not active():
        return tuple(xs)
    t = _on_device(torch.tensor(xs, dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tuple(float(v) for v in t.cpu())


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled); identity when not distributed."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=device() if device() is not None and device().type != "cpu" else None)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank (for what is measured, e.g. latencies,
    which would differ between ranks)."""
    if not active():
        return fn()
    if is_main():
        with alone():
            result = fn()
        return broadcast_object(result)
    return broadcast_object(None)


def check_same(what: str, digest: str) -> None:
    """Raise :class:`PlanMismatch` on every rank unless every rank computed the same ``digest``.

    Every rank takes part in the same two collectives whatever the outcome, so a mismatch is an error on all
    ranks at once, not a hang.
    """
    if not active():
        return
    main = broadcast_object(digest)
    bad = torch.tensor([0 if digest == main else 1 << rank()], dtype=torch.int64)
    bad = _on_device(bad)
    dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    mask = int(bad.cpu())
    if mask:
        ranks = [r for r in range(world_size()) if mask >> r & 1] if world_size() <= 62 else ["some"]
        mine = f" (this rank {rank()}: {digest})" if digest != main else ""
        raise PlanMismatch(f"{what}: rank(s) {', '.join(map(str, ranks))} computed a different result than rank 0 "
                           f"({main}){mine}; the ranks saw different weights or data, so data-parallel training "
                           "cannot continue. Check that every rank loads the same files, or run single-process")
    _STATE.setdefault("checked", []).append((what, digest))


def check_same_plan(plan: Any, what: str = "pruning plan") -> None:
    """Compare ``plan.digest()`` with rank 0's (:func:`check_same`)."""
    check_same(what, plan.digest())


def checked() -> list[tuple[str, str]]:
    """Every ``(what, digest)`` this rank confirmed equal to rank 0's, in order (for logs and tests)."""
    return list(_STATE.get("checked", []))


# ----------------------------------------------------------------------------------------------------------
# data


def shard_train(loader: Any, seed: int) -> tuple[Any, Any]:
    """``(loader, sampler)``: this rank's shard of a training loader, or ``(loader, None)`` when not distributed.

    The shard reads the same dataset through a ``DistributedSampler`` (shuffled with ``seed``; call
    ``sampler.set_epoch(e)`` every epoch); its batch size is ``loader.batch_size // world_size`` so that the
    global batch is the one the run asked for.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if not active() or not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader, None
    w = world_size()
    if loader.batch_size < w:
        raise BadInput(f"the batch size {loader.batch_size} is smaller than the {w} data-parallel ranks: raise "
                       "--batch-size to at least the number of ranks")
    sampler = DistributedSampler(loader.dataset, num_replicas=w, rank=rank(), shuffle=True, seed=seed,
                                 drop_last=False)
    shard = DataLoader(loader.dataset, batch_size=loader.batch_size // w, sampler=sampler,
                       num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                       drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn,
                       persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False)
    return shard, sampler


def shard_eval(loader: Iterable[Any], max_batches: int | None = None) -> Iterable[Any]:
    """This rank's share of the first ``max_batches`` batches of an evaluation loader (all of them if None).

    Batch ``b`` goes to rank ``b % world_size``, with exactly the images it has in a single process, so sums
    over the shards equal the single-process sums. A plain ``DataLoader`` in sequential order is re-read with
    only this rank's batches; anything else is iterated and the other ranks' batches skipped.
    """
    from torch.utils.data import DataLoader, SequentialSampler

    if not active():
        return _first(loader, max_batches)
    w, r = world_size(), rank()
    if (isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler)
            and loader.batch_size is not None):
        n, bs = len(loader.dataset), loader.batch_size  # type: ignore[arg-type]
        nb = len(loader) if max_batches is None else min(len(loader), max_batches)
        batches = [list(range(b * bs, min((b + 1) * bs, n))) for b in range(r, nb, w)]
        return DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    return (batch for i, batch in enumerate(_first(loader, max_batches)) if i % w == r)


def _first(loader: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


# ----------------------------------------------------------------------------------------------------------
# models


@contextlib.contextmanager
def data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """The module to run forward/backward through while training ``model`` (which must already be pruned and
    have its optimizer built on its own parameters): ``DistributedDataParallel(model)`` when distributed,
    ``model`` itself otherwise.

    On exit ``model`` is plain again: SyncBatchNorm layers (``init(sync_bn=True)``) are replaced by the original
    BatchNorms, which share their parameters and buffers, and the module is moved back to its device.
    """
    if not active():
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    originals: dict[str, nn.Module] = {}
    if _STATE["sync_bn"]:
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and name:  # noqa: SLF001
                originals[name] = m
                model.set_submodule(name, _to_sync_bn(m))
    d = device() or home
    model.to(d)
    try:
        net = DDP(model, device_ids=[d.index] if d.type == "cuda" else None)
        yield net
    finally:
        for name, m in originals.items():
            m.load_state_dict(model.get_submodule(name).state_dict())
            model.set_submodule(name, m)
        model.to(home)


def _to_sync_bn(bn: nn.Module) -> nn.Module:
    """A SyncBatchNorm sharing ``bn``'s parameters (so an optimizer built on ``bn`` trains it) and buffers."""
    sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(sync, name, getattr(bn, name))
    sync.train(bn.training)
    return sync


def average_bn_statistics(model: nn.Module, batches_seen: int | None = None) -> None:
    """After each rank re-estimated BatchNorm statistics on its own batches, give every rank the average,
    weighted by the batches each saw (``batches_seen``, or each layer's ``num_batches_tracked``).

    With a cumulative average (``momentum=None``, as ``torch.optim.swa_utils.update_bn`` does) this equals the
    single-process estimate over the union of the batches. No-op when not distributed.
    """
    if not active():
        return
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:  # noqa: SLF001
            continue
        n = float(batches_seen if batches_seen is not None else int(m.num_batches_tracked or 0))
        (total,) = sum_numbers(n)
        if total <= 0:
            continue
        with torch.no_grad():
            for buf in (m.running_mean, m.running_var):
                t = _on_device(buf.detach().double() * n)
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                buf.copy_((t.cpu() / total).to(buf.dtype))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(int(total))


# ----------------------------------------------------------------------------------------------------------
# ending a run: one error line, rank 0's outcome everywhere


def claim_error(code: int) -> bool:
    """Record that this rank failed with ``code``; True if it is the first rank to fail (it prints the one
    ``error:`` line), False if another rank already did (stay quiet). True when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        # failed before joining the group (bad arguments): every rank fails alike, rank 0 speaks for them
        return not launched() or os.environ.get("RANK", "0") == "0"
    if world_size() == 1:
        return True
    store = _store()
    if store is None:
        return is_main()
    try:
        first = int(store.add(_KEY + "failures", 1)) == 1
        if first:
            store.set(_KEY + "exit", str(code))
        if is_main():
            store.set(_KEY + "done", str(code))
        return first
    except Exception:  # noqa: BLE001 - the store went away with a dead rank: say it here
        return True


def first_error_code(default: int) -> int:
    """The exit code of the rank that failed first (``default`` if unknown)."""
    store = _store()
    try:
        if store is not None:
            store.wait([_KEY + "exit"], datetime.timedelta(seconds=5))
            return int(store.get(_KEY + "exit"))
    except Exception:  # noqa: BLE001
        pass
    return default


def main_done(code: int = 0) -> None:
    """Rank 0: tell the waiting ranks that the run ended with ``code``."""
    store = _store()
    if active() and is_main() and store is not None:
        store.set(_KEY + "done", str(code))


def wait_for_main() -> int:
    """Other ranks: wait (polling the rendezvous store, within the group's timeout) until rank 0 has written
    the bundle or failed; return its exit code."""
    store = _store()
    if not active() or is_main() or store is None:
        return 0
    deadline = time.monotonic() + timeout_s()
    while time.monotonic() < deadline:
        if store.check([_KEY + "done"]):
            return int(store.get(_KEY + "done"))
        time.sleep(0.2)
    raise DeployPruneError(f"rank 0 did not finish within {timeout_s():.0f} s ({TIMEOUT_ENV})")
