"""The criterion protocol, its typed options, and the registry.

A criterion turns the channels of one :class:`~deploy_prune.surgery.groups.Group` into scores, one per
channel, **lower = pruned first**. The planner (:mod:`deploy_prune.surgery.plan`) decides how many to remove.

* ``scope = "local"``: the planner walks groups in graph order and removes ``ratio`` of each group.
  ``score`` receives the set of channel roots already removed upstream, which greedy L1 uses.
* ``scope = "global"``: all channels are ranked against one threshold (Network Slimming).
* ``prepare`` runs once before scoring with the model, the analysis and the run context: slimming's
  sparsity training and APoZ's calibration pass start there.
* ``Options``: a frozen dataclass of the criterion's own options, each field declared with :func:`option`
  (help text, choices, minimum). The CLI builds its flags, choices and help from these declarations, and
  ``needs_data`` decides the "this criterion needs --data" check: adding a criterion is one module plus
  ``@register``.
* ``pairing``: how the structured model and its unstructured twin are made (``"structured_first"``: prune
  channels, then mask the dense model to the same non-zero count; lottery's ``"ticket_first"``). The
  strategies live in :mod:`deploy_prune.prune`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput, opt
from deploy_prune.surgery.graph import DependencyGraph, Group


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None,
           integer: bool = False) -> Any:
    """Declare one field of a criterion's ``Options``: its default, help text and constraints.

    The field's name is the option's name everywhere: the Python API keyword, and ``--name-with-dashes`` on
    the command line (two criteria may share an option only with the same default and help).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                            "integer": integer})


@dataclass(frozen=True)
class CriterionOptions:
    """Base class of every criterion's ``Options``: checks each field against its declaration."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise BadInput(f"{opt(f.name)} {value!r} is not valid: use one of {', '.join(meta['choices'])}")
            if meta.get("integer") and (isinstance(value, bool) or not isinstance(value, int)):
                raise BadInput(f"{opt(f.name)} must be an integer, got {value!r}")
            if meta.get("minimum") is not None:
                if not isinstance(value, (int, float)) or math.isnan(value) or value < meta["minimum"]:
                    raise BadInput(f"{opt(f.name)} must be >= {meta['minimum']}, got {value!r}")


@dataclass(frozen=True)
class NoOptions(CriterionOptions):
    """For criteria without options of their own."""


@dataclass
class ScoreContext:
    """What a criterion may use besides the weights, and where it leaves what the report should show.

    Attributes:
        data: a :class:`deploy_prune.data.DataBundle`, or None when the run has no data.
        seed: the run's seed (every random choice is seeded from it).
        progress: whether long steps (sparsity training) may show progress bars.
        artifacts: details for the report's ``criterion_details`` (JSON-serialisable).
        report: entries for the top level of the report (e.g. slimming's ``gamma_hist``).
        plots: extra plots for the bundle: file name → a function that draws it to a path.
    """

    data: Any = None
    seed: int = 0
    progress: bool = True
    artifacts: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Callable[[Path], Any]] = field(default_factory=dict)


class Criterion(Protocol):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help: the paper and what is scored
    needs_data: ClassVar[bool]
    data_use: ClassVar[str]  # what the data is for (errors and --help), e.g. "calibration data to count zeros"
    scope: ClassVar[str]
    pairing: ClassVar[str]
    Options: ClassVar[type[CriterionOptions]]

    def __init__(self, options: Any = None) -> None: ...

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None: ...

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor: ...


class BaseCriterion:
    """Defaults for the optional parts of the protocol; criteria may subclass it."""

    summary: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    data_use: ClassVar[str] = "data"
    scope: ClassVar[str] = "local"
    pairing: ClassVar[str] = "structured_first"
    Options: ClassVar[type[CriterionOptions]] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def prepare(self, model: nn.Module, graph: DependencyGraph, ctx: ScoreContext) -> None:
        """Nothing to prepare by default."""


_CRITERIA: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a criterion to the registry (a duplicate name is a programming error)."""
    if cls.name in _CRITERIA:
        raise ValueError(f"criterion {cls.name!r} already registered by {_CRITERIA[cls.name].__module__}")
    for attr in ("summary", "needs_data", "scope", "pairing", "Options", "prepare", "score"):
        if not hasattr(cls, attr):
            raise TypeError(f"criterion {cls.__name__} lacks {attr!r} (subclass BaseCriterion for defaults)")
    _CRITERIA[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registration (tests that register a toy criterion clean up with this)."""
    _CRITERIA.pop(name, None)


def get(name: str) -> type:
    """The criterion class registered as ``name``."""
    if name not in _CRITERIA:
        raise BadInput(f"unknown criterion {name!r}: choose one of {', '.join(names())}")
    return _CRITERIA[name]


def create(name: str, options: Any = None) -> Criterion:
    """An instance of criterion ``name`` with ``options`` (an instance of its ``Options``; None = defaults)."""
    crit: Criterion = get(name)(options)
    return crit


def names() -> list[str]:
    """Registered criterion names, in registration order (the built-ins first)."""
    return list(_CRITERIA)


def option_fields() -> dict[str, tuple[Any, list[str]]]:
    """Every declared criterion option: name → (its dataclass field, the criteria that take it)."""
    out: dict[str, tuple[Any, list[str]]] = {}
    for cname, cls in _CRITERIA.items():
        for f in fields(cls.Options):
            if f.name in out:
                prev = out[f.name][0]
                if prev.default != f.default or prev.metadata.get("help") != f.metadata.get("help"):
                    raise ValueError(f"option {f.name!r} is declared differently by {out[f.name][1]} and {cname}")
                out[f.name][1].append(cname)
            else:
                out[f.name] = (f, [cname])
    return out


def make_options(name: str, values: dict[str, Any]) -> CriterionOptions:
    """Build criterion ``name``'s options from ``values`` (option name → value; missing ones default).

    Raises:
        BadInput: a value for an option this criterion does not take, or a value its declaration rejects.
    """
    cls = get(name).Options
    own = {f.name for f in fields(cls)}
    foreign = sorted(k for k in values if k not in own)
    if foreign:
        takers = option_fields()
        parts = [f"{opt(k)} is for {', '.join(takers[k][1]) if k in takers else 'no criterion'}" for k in foreign]
        raise BadInput(f"{'; '.join(parts)}, not {name}: drop it or choose that criterion")
    return cls(**values)


def default_of(f: Any) -> Any:
    """A dataclass field's default value."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # pragma: no cover - options use plain defaults
