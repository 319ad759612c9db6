"""The package's exceptions.

Every error a user can fix is a :class:`BadInput`: the CLI prints ``error: <message>`` on one line and
exits with code 2. Messages name the problem *and* the fix. Anything else is an internal failure (exit 1).

The library never spells a command-line flag. Where a fix is "set option X", the message names the option
with :func:`opt`; the text then reads ``ratio`` through the Python API (``str(exc)``) and ``--ratio`` on the
command line (:meth:`DeployPruneError.cli_message`), so both say what to change in their own terms.
"""

from __future__ import annotations

import re

_MARK = "\x1f"
_OPTION = re.compile(_MARK + r"([A-Za-z_][A-Za-z0-9_]*)" + _MARK)


def opt(name: str) -> str:
    """Mark the option ``name`` (a keyword of the Python API, e.g. ``"input_shape"``) inside an error message.

    ``str()`` of the exception shows ``input_shape``; the CLI shows ``--input-shape``.
    """
    return f"{_MARK}{name}{_MARK}"


def render(message: str, *, cli: bool) -> str:
    """Replace the option marks of ``message`` by flags (``cli=True``) or by API keyword names."""
    if cli:
        return _OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
    return _OPTION.sub(lambda m: m.group(1), message)


class DeployPruneError(Exception):
    """Base class of every error raised on purpose by deploy-prune."""

    exit_code = 1

    @property
    def raw(self) -> str:
        """The message with its option marks, for re-raising as another error type."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return render(self.raw, cli=False)

    def cli_message(self) -> str:
        """The one-line message with options spelled as command-line flags."""
        return render(self.raw, cli=True)


class BadInput(DeployPruneError):
    """The user's input is wrong (unknown name, unreadable file, bad shape, missing data...). Exit code 2."""

    exit_code = 2


class OutOfMemory(BadInput):
    """The machine ran out of memory (exit code 2): the fix is the user's (more memory, a smaller input)."""


_OOM_TEXT = ("can't allocate memory", "bad_alloc", "out of memory", "failed to allocate memory",
             "not enough memory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it was raised from is an allocation failure: Python's MemoryError (what
    a C++ ``std::bad_alloc`` becomes), torch's "DefaultCPUAllocator: can't allocate memory" and CUDA
    out-of-memory errors, ONNX Runtime's allocator failures."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        if any(t in str(exc).lower() for t in _OOM_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def out_of_memory(exc: BaseException, option: str = "input_shape") -> OutOfMemory:
    """The one-line error for an allocation failure ``exc``; ``option`` is what sets the input's size."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return OutOfMemory(f"out of memory ({type(exc).__name__}: {first}): this model at this input shape needs more "
                       f"memory than the process may use; free memory, give a smaller {opt(option)} "
                       "(batch or resolution), or run on a machine with more memory")


class UnsupportedModel(BadInput):
    """The model cannot be traced or pruned at all; the message names the operation and the module."""


class TargetUnreachable(BadInput):
    """A latency target cannot be met within the planner's limits; the message gives the best reachable."""


class ParityError(DeployPruneError):
    """An exported ONNX file does not reproduce the PyTorch model's outputs. Exit code 1."""


class Interrupted(DeployPruneError):
    """The user interrupted the run (Ctrl-C). Exit code 130."""

    exit_code = 130
