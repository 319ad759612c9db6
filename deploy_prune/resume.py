"""Resumable runs: one staging folder per ``--out``, a lock, and a checkpoint after every training epoch.

A run writes everything under ``.OUT.partial/`` beside ``--out`` (OUT is the bundle folder's name):

* ``lock``: held with ``flock`` for the whole run (it holds the owner's pid). A second run with the same
  ``--out`` fails at once with a clear error (exit 2) instead of mixing two bundles; the lock dies with its
  process, so a killed run never blocks the next one.
* ``run.json``: the fingerprint of the run's arguments (everything but ``--out``, ``--force``, ``--resume`` and
  ``--quiet``) and of its input files. ``--resume`` refuses state from a run with other arguments.
* ``checkpoints/train-NNN.pt``: one file per training run of the pipeline (sparsity training, each finetuning,
  each lottery round...), numbered in the order the pipeline reaches them, rewritten (atomically) after every
  epoch with the model, the optimizer, the RNG states and the losses so far; the optimizer is dropped once
  that training run is complete. ``checkpoints/index.json`` summarises them.
* ``bundle/``: the bundle being written; it is moved to ``--out`` in one rename at the end, then the whole
  folder is removed.

On ``--resume`` the pipeline runs again from the start with the same arguments: loading, analysis and
pruning are deterministic and cheap, and each training run restores its checkpoint (a completed one is not
trained again, an interrupted one continues from its last completed epoch with the same optimizer and RNG
state), so a CPU run with the same seed ends with the same kept channels and the same weights as an
uninterrupted run. Anything measured (a latency target's probes, ``round_to auto``) is measured again; if the
search then chooses other widths, the checkpoints no longer fit and are not used (a note says so).

Ctrl-C keeps the folder when it holds a completed epoch and says how to resume (exit 130); any other failure
(bad input) removes it. A run that finds a folder left by a killed run reports it: ``--resume`` continues it,
``--force`` discards it, and without either the run stops with an error that names both, so saved training is
never thrown away silently and staging folders never pile up. Staging folders of earlier versions
(``.OUT.XXXXXXXX`` from ``tempfile.mkdtemp``, ``.OUT.old-TIME``) are removed with a note.

Under torchrun, rank 0 owns the folder (lock, checkpoints, bundle); every rank reads the same checkpoint when
resuming (one machine, or a filesystem all ranks share), and rank 0 decides which one (broadcast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploy_prune import distributed
from deploy_prune.errors import BadInput, DeployPruneError, Interrupted, opt

TRACE_ENV = "DEPLOY_PRUNE_TRACE"
_CURRENT: dict[str, Workspace | None] = {"ws": None}
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}|old-\d+)$")
_BUNDLE_FILES = re.compile(r"^(raw|.*\.onnx(\.data)?|pruned\.pt|report\.(json|md)|.*\.png|latency_samples\.json)$")


def current() -> Workspace | None:
    """The running pipeline's workspace (None outside ``deploy-prune run``: no checkpoints are written)."""
    return _CURRENT["ws"]


def partial_dir(out: Path) -> Path:
    """The staging folder of ``out``: ``.NAME.partial`` beside it."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.partial"


def fingerprint(spec: Any) -> dict[str, Any]:
    """What must be equal for ``--resume`` to continue a run: every argument of ``spec`` except where the
    bundle goes and how it is shown, and the size and modification time of the input files."""
    def enc(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): enc(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)

    args = enc(spec)
    for key in ("out", "force", "progress", "resume"):
        args.pop(key, None)
    files = {}
    for p in (spec.model.spec, spec.model.weights, spec.data):
        if p:
            path = Path(p.split("imagefolder:", 1)[-1]).expanduser()
            if path.is_file():
                st = path.stat()
                files[str(path.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"args": args, "files": files}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _shapes(model: nn.Module) -> str:
    text = json.dumps([[k, list(v.shape)] for k, v in model.state_dict().items()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Workspace:
    """The staging folder of one run (see the module docstring); make it with :meth:`open`."""

    def __init__(self, out: Path, *, owner: bool) -> None:
        self.out = Path(out).resolve()
        self.root = partial_dir(self.out)
        self.bundle = self.root / "bundle"
        self.checkpoints = self.root / "checkpoints"
        self.owner = owner  # rank 0: holds the lock, writes checkpoints and the bundle
        self.calls = 0
        self.log: list[dict[str, Any]] = []
        self.valid = True  # False once a checkpoint did not fit: later ones are not used either
        self._fd: int | None = None

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    def open(cls, out: Path, fp: dict[str, Any], *, resume: bool, force: bool,
             note: Callable[[str], None] = lambda _: None) -> Workspace:
        """Take the lock and prepare the folder (rank 0), or just point at it (other ranks)."""
        ws = cls(out, owner=distributed.is_main())
        if ws.owner:
            try:
                ws._prepare(fp, resume=resume, force=force, note=note)
            except BaseException:
                ws._unlock()
                raise
        return ws

    def _prepare(self, fp: dict[str, Any], *, resume: bool, force: bool, note: Callable[[str], None]) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._remove_legacy(note)
        saved = self._saved_epochs()
        run_json = self.root / "run.json"
        if resume and run_json.is_file():
            try:
                old = json.loads(run_json.read_text())
            except (OSError, ValueError):
                old = None
            if old != fp:
                diff = _differences(old, fp) if isinstance(old, dict) else ["run.json unreadable"]
                raise BadInput(f"{opt('resume')}: the interrupted run in {self.root} was started with other "
                               f"arguments or inputs (differs in: {', '.join(diff[:5])}); rerun it with the same "
                               f"arguments, or drop {opt('resume')} and pass {opt('force')} to start over")
            note(f"resuming the interrupted run in {self.root}: {saved} training epoch(s) already done")
            shutil.rmtree(self.bundle, ignore_errors=True)  # a half-written bundle is rewritten from scratch
        else:
            if resume:
                note(f"nothing to resume for {self.out} (no {self.root.name}); starting from the beginning")
            elif saved and not force:
                raise BadInput(f"an interrupted run left {saved} saved training epoch(s) in {self.root}: rerun the "
                               f"same command with {opt('resume')} to continue it, or pass {opt('force')} to "
                               "discard it")
            elif run_json.exists() or self.checkpoints.exists() or self.bundle.exists():
                note(f"discarding the state an interrupted run left in {self.root}"
                     + (f" ({saved} saved epoch(s))" if saved else ""))
            for p in (self.checkpoints, self.bundle, run_json):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            _atomic_text(json.dumps(fp, indent=1, sort_keys=True), run_json)
        self.checkpoints.mkdir(exist_ok=True)

    def _remove_legacy(self, note: Callable[[str], None]) -> None:
        """Staging folders older versions left beside --out when killed (only bundle files inside)."""
        for p in self.out.parent.iterdir():
            m = _LEGACY.match(p.name)
            if not m or m.group("name") != self.out.name or not p.is_dir() or p.is_symlink():
                continue
            if all(_BUNDLE_FILES.match(c.name) for c in p.iterdir()):
                shutil.rmtree(p, ignore_errors=True)
                note(f"removed {p}, a staging folder left by a killed run")

    def _lock(self) -> None:
        for _ in range(20):
            self.root.mkdir(exist_ok=True)
            path = self.root / "lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    pid = path.read_text().strip() or "?"
                except OSError:
                    pid = "?"
                raise BadInput(f"another deploy-prune run (pid {pid}) is writing {opt('out')} {self.out}; wait "
                               f"for it to finish or choose another {opt('out')}") from None
            try:  # the folder may have been removed (and recreated) between open and flock: lock the live file
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise DeployPruneError(f"could not lock {self.root / 'lock'}")

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _saved_epochs(self) -> int:
        index = self.checkpoints / "index.json"
        try:
            calls = json.loads(index.read_text())["calls"]
            return sum(int(c["done"]) for c in calls.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    @contextlib.contextmanager
    def active(self, note: Callable[[str], None] = lambda _: None) -> Iterator[Workspace]:
        """Make this the current workspace; on Ctrl-C keep what can be resumed and raise :class:`Interrupted`;
        on bad input remove everything; on any other failure keep the saved epochs (with a note)."""
        _CURRENT["ws"] = self
        try:
            yield self
        except KeyboardInterrupt:
            if not self.owner:
                raise Interrupted("interrupted") from None
            saved = self._saved_epochs()
            if saved:
                shutil.rmtree(self.bundle, ignore_errors=True)
                raise Interrupted(f"interrupted; {saved} completed training epoch(s) are saved in {self.root}: "
                                  f"rerun the same command with {opt('resume')} to continue from there") from None
            self.discard()
            raise Interrupted("interrupted; nothing was written") from None
        except BadInput:
            self.discard()
            raise
        except BaseException:
            if self.owner:
                shutil.rmtree(self.bundle, ignore_errors=True)
                saved = self._saved_epochs()
                if saved:
                    note(f"{saved} completed training epoch(s) are kept in {self.root}: rerun with "
                         f"{opt('resume')} to continue, or with {opt('force')} to start over")
                else:
                    self.discard()
            raise
        finally:
            _CURRENT["ws"] = None
            self._trace()
            self._unlock()

    def discard(self) -> None:
        """Remove the whole staging folder (rank 0)."""
        if self.owner:
            shutil.rmtree(self.root, ignore_errors=True)

    def commit(self, force: bool) -> None:
        """Move the finished bundle to ``--out`` in one rename (replacing it with ``force``), then remove the
        staging folder; the lock is held throughout, so no other run can interleave."""
        out = self.out
        if out.exists():
            if any(out.iterdir()) and not force:
                raise BadInput(f"{opt('out')} {out} became non-empty during the run; pass {opt('force')} to "
                               "replace it")
            trash = self.root / "old"
            out.rename(trash)
            self.bundle.rename(out)
        else:
            self.bundle.rename(out)
        shutil.rmtree(self.root, ignore_errors=True)

    def _trace(self) -> None:
        """With ``DEPLOY_PRUNE_TRACE=DIR``: write this rank's training log and plan digests to
        ``DIR/rank-R.json`` (for debugging data-parallel runs, and for the tests)."""
        where = os.environ.get(TRACE_ENV)
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / f"rank-{distributed.rank()}.json").write_text(json.dumps(
                {"rank": distributed.rank(), "world_size": distributed.world_size(),
                 "training": [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.log],
                 "checked": distributed.checked()}, indent=1))

    # -- checkpoints --------------------------------------------------------------------------------------

    def _file(self, call: int) -> Path:
        return self.checkpoints / f"train-{call:03d}.pt"

    def begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, desc: str, epochs: int,
              generator: torch.Generator | None = None, hook: Any = None) -> tuple[int, list[float]]:
        """Called by the training loop before its first epoch (after seeding, inside the DDP wrap): restore
        this training run's checkpoint if there is one; return ``(first epoch to train, losses so far)``."""
        call = self.calls
        self.calls += 1
        entry = {"call": call, "desc": desc, "epochs": epochs, "restored": 0, "trained": 0, "losses": [],
                 "seconds": 0.0, "_t0": time.perf_counter()}
        self.log.append(entry)
        path = self._file(call)
        done = 0
        if self.owner and self.valid and path.is_file():
            try:
                head = torch.load(path, weights_only=True, map_location="cpu")
                done = int(head["done"]) if head.get("shapes") == _shapes(model) and head.get("epochs") == epochs \
                    and head.get("desc") == desc else -1
            except Exception:  # noqa: BLE001 - a damaged file: train this run again
                done = -1
        done = distributed.broadcast_object(done)
        if done < 0:
            self.valid = False
            return 0, []
        if done == 0:
            return 0, []
        state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        if done < epochs:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
        if hook is not None and state.get("hook") is not None and hasattr(hook, "load_state_dict"):
            hook.load_state_dict(state["hook"])
        entry["restored"] = done
        entry["losses"] = list(state["losses"])
        return done, list(state["losses"])

    def end_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int, losses: list[float],
                  generator: torch.Generator | None = None, hook: Any = None) -> None:
        """Called by the training loop after every epoch: save the state to resume from (rank 0)."""
        entry = self.log[-1]
        entry["trained"] += 1
        entry["losses"] = list(losses)
        entry["seconds"] = round(time.perf_counter() - entry["_t0"], 3)  # training time of this run so far
        if not self.owner:
            return
        done, epochs = epoch + 1, entry["epochs"]
        state = {"desc": entry["desc"], "epochs": epochs, "done": done, "shapes": _shapes(model),
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": optimizer.state_dict() if done < epochs else None,
                 "rng": torch.get_rng_state(), "losses": list(losses),
                 "generator": generator.get_state() if generator is not None else None,
                 "hook": hook.state_dict() if hook is not None and hasattr(hook, "state_dict") else None}
        _atomic_save(state, self._file(entry["call"]))
        index = self.checkpoints / "index.json"
        try:
            calls = json.loads(index.read_text())["calls"]
        except (OSError, ValueError, KeyError):
            calls = {}
        calls[str(entry["call"])] = {"desc": entry["desc"], "done": done, "epochs": epochs,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _atomic_text(json.dumps({"calls": calls}, indent=1), index)
