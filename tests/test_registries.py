"""One place per addition: a criterion or a variant defined and registered here runs through the whole pipeline.

The report schema is the public contract and enumerates the criteria and variant kinds it knows; a new entry
there is a contract change, so these tests extend the enum in memory for the toy entries and touch no file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import pytest
import torch
import torch.nn as nn

from deploy_prune import criteria, report, variants
from deploy_prune.criteria import BaseCriterion, CriterionOptions, option
from deploy_prune.errors import BadInput
from deploy_prune.pipeline import run
from deploy_prune.spec import BenchSpec, ModelSource, PrunePlan, PruneSpec, RunSpec, TrainSpec
from deploy_prune.surgery import DependencyGraph, Group


@pytest.fixture
def schema_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Extend the report schema's criterion and kind enums in memory."""
    schema = copy.deepcopy(report._schema())

    def add(criterion: str | None = None, kind: str | None = None) -> None:
        if criterion:
            schema["properties"]["criterion"]["enum"].append(criterion)
        if kind:
            schema["properties"]["variants"]["items"]["properties"]["kind"]["enum"].append(kind)

    monkeypatch.setattr(report, "_schema", lambda: schema)
    yield add


@dataclass(frozen=True)
class ToyOptions(CriterionOptions):
    toy_power: float = option(2.0, "toy: the norm's exponent.", minimum=1.0)


class ToyCriterion(BaseCriterion):
    """Per-filter L_p norm (p = toy_power): a criterion written and registered in one place."""

    name: ClassVar[str] = "toy_lp"
    summary: ClassVar[str] = "filter L_p norm (a test's toy)"
    Options = ToyOptions
    options: ToyOptions
    seen_groups: ClassVar[int] = 0

    def score(self, graph: DependencyGraph, group: Group, removed: frozenset[int]) -> torch.Tensor:
        ToyCriterion.seen_groups += 1
        norms = {m: graph.module(m).weight.detach().flatten(1).norm(p=self.options.toy_power, dim=1)
                 for m in group.modules}
        return torch.tensor([sum(float(norms[m][i]) for m, i in ch.producers) for ch in group.channels])


def _spec(out: Path, **prune: object) -> RunSpec:
    return RunSpec(model=ModelSource(spec="builtin:mnist_cnn"), prune=PruneSpec(**prune),
                   train=TrainSpec(epochs=0), bench=BenchSpec(iters=2), out=out, progress=False)


def test_a_toy_criterion_registered_in_one_place_runs_end_to_end(tmp_path: Path, schema_with) -> None:
    criteria.register(ToyCriterion)
    try:
        schema_with(criterion="toy_lp")
        assert "toy_lp" in criteria.names() and "toy_power" in criteria.option_fields()
        ToyCriterion.seen_groups = 0
        rep = run(_spec(tmp_path / "b", criterion="toy_lp", options=ToyOptions(toy_power=3.0), ratio=0.5))
        assert rep["criterion"] == "toy_lp" and ToyCriterion.seen_groups > 0
        # the toy's choice is the L3-norm ranking, computed independently here
        model = __import__("deploy_prune.loading", fromlist=["load_model"]).load_model("builtin:mnist_cnn").model
        first = rep["layers"][0]
        w = model.get_submodule(first["name"]).weight.detach().flatten(1)
        expected = sorted(torch.argsort(w.norm(p=3, dim=1), descending=True)[: first["out_channels_after"]].tolist())
        assert first["kept"] == expected
        with pytest.raises(BadInput, match="toy_power"):
            ToyOptions(toy_power=0.5)
    finally:
        criteria.unregister("toy_lp")
    assert "toy_lp" not in criteria.names()


def _half_precision(pair: object, dense: nn.Module) -> nn.Module:
    """A toy variant: the structured model with its weights rounded through float16 and back."""
    m = copy.deepcopy(pair.structured.model)  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def test_a_toy_variant_registered_in_one_place_is_made_benchmarked_and_reported(tmp_path: Path,
                                                                                 schema_with) -> None:
    variants.register(variants.Variant("rounded", "rounded.onnx", "structured, weights rounded through fp16",
                                       module=_half_precision, optional=True))
    try:
        schema_with(kind="rounded")
        assert [v.kind for v in variants.selected(())] == ["dense", "unstructured", "structured"]
        spec = _spec(tmp_path / "b", ratio=0.5)
        rep = run(RunSpec(**{**spec.__dict__, "variants": ("rounded",)}))
        kinds = {v["kind"]: v for v in rep["variants"]}
        assert set(kinds) == {"dense", "unstructured", "structured", "rounded"}
        assert kinds["rounded"]["params"] == kinds["structured"]["params"]
        assert kinds["rounded"]["parity"]["ok"] and kinds["rounded"]["latency_ms"]["n"] == rep["bench"]["iters"] >= 2
        onnx.checker.check_model(str(tmp_path / "b" / "rounded.onnx"))
        saved = json.loads((tmp_path / "b" / "report.json").read_text())
        assert [v["kind"] for v in saved["variants"]][-1] == "rounded"
        assert "rounded" in json.loads((tmp_path / "b" / "latency_samples.json").read_text())["samples"]
    finally:
        variants.unregister("rounded")


def test_registries_refuse_duplicates_and_bad_entries() -> None:
    with pytest.raises(ValueError, match="already registered"):
        criteria.register(criteria.get("l1"))
    with pytest.raises(ValueError, match="exactly one of"):
        variants.Variant("x", "x.onnx", "nothing to make it from")
    with pytest.raises(ValueError, match="already writes"):
        variants.register(variants.Variant("x", "model.onnx", "clash", module=lambda pair, dense: dense))
    with pytest.raises(BadInput, match="unknown variant"):
        variants.selected(("nope",))


def test_plan_composes_steps_and_survives_json() -> None:
    widths = {"a": 8, "b": 4}
    first = PrunePlan(widths, {"a": [0, 2, 4, 6, 7]})
    second = PrunePlan({"a": 5, "b": 4}, {"a": [1, 3, 4], "b": [0, 3]})  # numbering of what first kept
    both = first.then(second)
    assert dict(both.kept) == {"a": (2, 6, 7), "b": (0, 3)}
    assert both.removed() == {"a": [0, 1, 3, 4, 5], "b": [1, 2]}
    assert PrunePlan.from_json(json.loads(json.dumps(both.to_json()))) == both
    assert both.digest() == PrunePlan.from_removed(both.removed(), widths).digest()
    assert both.removed_fraction() == pytest.approx(7 / 12, abs=1e-4)
    with pytest.raises(ValueError, match="outside"):
        PrunePlan(widths, {"a": [8]})
