"""Assemble a run's report (:func:`build`) and render it: ``report.json`` (validated against the schema, v2),
``report.md`` and plots (:func:`write_report`).

Both are pure: everything shown comes from the stage results, the :class:`~deploy_prune.timing.BenchResult`
and the extras passed in; nothing is measured here, and ONNX Runtime is never imported. Plots use matplotlib's
object API with the Agg canvas (no pyplot, so no global backend switch and no display needed).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy_prune import variants as variants_mod
from deploy_prune.errors import DeployPruneError
from deploy_prune.timing import BenchResult

if TYPE_CHECKING:
    from deploy_prune.loading import LoadedModel
    from deploy_prune.pipeline import Made
    from deploy_prune.prune import PrunedPair
    from deploy_prune.spec import RunSpec

__all__ = ["KINDS", "SCHEMA_VERSION", "build", "validate_report", "verdict", "write_report"]

SCHEMA_VERSION = 2
#: The variant kinds every report has exactly once, in display order (others, e.g. int8, at most once).
KINDS = ("dense", "unstructured", "structured")
_MAX_LAYER_ROWS = 40
_MAX_SCHEMA_ERRORS = 5
# Speedups within this band of 1.0 are reported as "no measurable speedup": run-to-run noise on a shared
# machine is a few percent (docs/onnx-runtime.md §3, §7).
_NOISE = 0.10


# ----------------------------------------------------------------------------------------------------------
# validation


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    """The report schema shipped inside the package (``deploy_prune/report.schema.json``)."""
    text = resources.files("deploy_prune").joinpath("report.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_report(report: Mapping[str, Any]) -> None:
    """Check a report against ``report.schema.json`` and the contract's one-variant-per-kind rule.

    Extra keys beyond the schema (``verdict``, ``cleanup``, ``notes``, ``bench``, ...) are allowed.

    Args:
        report: the ``report.json`` content.

    Raises:
        DeployPruneError: the report does not conform; the message lists the first few problems with their
            JSON paths.
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
    if not problems:
        # The schema cannot say "exactly one of each kind"; the contract does.
        kinds = [v.get("kind") for v in report["variants"]]
        if any(kinds.count(k) != 1 for k in KINDS) or len(set(kinds)) != len(kinds):
            problems.append(f"variants: need exactly one each of {', '.join(KINDS)} and at most one of any other "
                            f"kind, got {', '.join(map(str, kinds))}")
    if problems:
        shown = "; ".join(problems[:_MAX_SCHEMA_ERRORS])
        more = f" (and {len(problems) - _MAX_SCHEMA_ERRORS} more)" if len(problems) > _MAX_SCHEMA_ERRORS else ""
        raise DeployPruneError(f"report does not match report.schema.json: {shown}{more}")


# ----------------------------------------------------------------------------------------------------------
# assembly


def build(*, spec: RunSpec, loaded: LoadedModel, shape: tuple[int, ...], pair: PrunedPair, made: Sequence[Made],
          bench: BenchResult, environment: Mapping[str, Any]) -> dict[str, Any]:
    """The report dict of a run, from its stage results (validated when written by :func:`write_report`)."""
    dense_p50 = bench.stats["dense"].p50
    structured = pair.structured
    epochs = spec.train.epochs if spec.data is not None else 0
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "model": spec.model.spec, "criterion": spec.prune.criterion,
        "ratio": pair.ratio, "input_shape": list(shape), "environment": dict(environment),
        "variants": [_variant_row(m, bench, dense_p50) for m in made],
        "layers": structured.plan.layers(),
        "outputs": _outputs(made),
        "arch": loaded.arch, "data": spec.data, "seed": spec.prune.seed, "round_to": spec.prune.round_to,
        "steps": spec.prune.steps, "epochs": epochs,
        "accuracy_before_finetune": {"structured": structured.accuracy_before_finetune,
                                     "unstructured": pair.unstructured_accuracy_before},
        "cleanup": {m.kind: m.cleanup for m in made if m.cleanup is not None},
        "skipped_layers": structured.skipped,
        "bench": {"method": bench.method, "iters": bench.iters, "iters_asked": spec.bench.iters,
                  "min_seconds": spec.bench.min_seconds},
        "notes": list(loaded.notes) + ([] if spec.data is not None else
                                       ["accuracy unknown: no --data given, so no finetuning and no evaluation"]),
    }
    for m in made:
        report["notes"] += list(m.notes)
        if m.parity.get("note"):  # e.g. a random-init network whose outputs vanish (judged relative to scale)
            report["notes"].append(f"{m.kind} parity: {m.parity['note']}")
        if m.details:
            report.setdefault("variant_details", {})[m.kind] = m.details
    if spec.prune.layer_ratios:
        report["layer_ratios"] = dict(spec.prune.layer_ratios)
        report["notes"].append("per-layer ratios from --from-sensitivity replaced --ratio; `ratio` is the share "
                               "of all channels removed")
    report.update(pair.report)
    if "target" in report:
        report["target"] = _target_outcome(report["target"], report["variants"])
    if spec.prune.steps > 1:
        report["schedule"] = structured.steps
    report.update(structured.criterion.report)
    if structured.criterion.artifacts:
        report["criterion_details"] = dict(structured.criterion.artifacts)
    report["verdict"] = verdict(report)
    return report


def _target_outcome(target: dict[str, Any], variants: list[dict[str, Any]]) -> dict[str, Any]:
    """``achieved`` and ``met``, from the final interleaved benchmark (the search's probes came before it)."""
    from deploy_prune.spec import TARGET_BAND as BAND

    st = next(v for v in variants if v["kind"] == "structured")
    if target["kind"] == "speedup":
        achieved = float(st["speedup_vs_dense"])
        met = target["value"] <= achieved <= BAND * target["value"]
    else:
        achieved = float(st["latency_ms"]["p50"])
        met = target["value"] / BAND <= achieved <= target["value"]
    return {"kind": target["kind"], "value": target["value"], "achieved": round(achieved, 4), "met": bool(met),
            **{k: v for k, v in target.items() if k not in ("kind", "value")}}


def _outputs(made: Sequence[Made]) -> list[dict[str, Any]]:
    """Each model output's name and shape at the run's input shape (the same for every variant, as the
    pipeline checks), from the first variant's parity run: ``[{"name": "out", "shape": [1, 21, 256, 256]}]``."""
    for m in made:
        if m.parity.get("outputs"):
            return [{"name": n, "shape": list(r["shape"])} for n, r in m.parity["outputs"].items()]
    return []


def _variant_row(m: Made, bench: BenchResult, dense_p50: float) -> dict[str, Any]:
    st = bench.stats[m.kind]
    parity: dict[str, Any] = {"max_abs_diff": float(m.parity["max_abs_diff"]), "ok": bool(m.parity["ok"])}
    per = m.parity.get("outputs") or {}
    if len(per) > 1:  # several outputs: each one's max|diff|, judged against its own scale
        parity["outputs"] = {n: {"max_abs_diff": float(r["max_abs_diff"]), "ok": bool(r["ok"])}
                             for n, r in per.items()}
    if "top1_agreement" in m.parity:
        parity["top1_agreement"] = float(m.parity["top1_agreement"])
    return {"kind": m.kind, "onnx": m.file, "params": m.params, "nonzero_params": m.nonzero_params,
            "macs": m.macs, "onnx_bytes": m.onnx_bytes, "latency_ms": st.to_dict(),
            "speedup_vs_dense": round(dense_p50 / st.p50, 4), "accuracy": m.accuracy, "parity": parity}


# ----------------------------------------------------------------------------------------------------------
# formatting helpers


def _by_kind(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["kind"]: v for v in report.get("variants", [])}


def _ordered(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Variants in display order: dense, unstructured, structured, then anything else."""
    rank = {k: i for i, k in enumerate(KINDS)}
    return sorted(report.get("variants", []), key=lambda v: rank.get(v.get("kind"), len(KINDS)))


def _x(speedup: float) -> str:
    """Format a speedup: one decimal above 1 (3.7x), two below (0.97x)."""
    return f"{speedup:.1f}x" if speedup >= 1 else f"{speedup:.2f}x"


def _human(n: float, unit: str = "") -> str:
    """1234567 → '1.23 M'; small numbers as integers."""
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.0f}{' ' + unit if unit else ''}"


def _ms(x: float) -> str:
    """Milliseconds with three significant digits (0.0277, 3.15, 102.7)."""
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def _bytes(n: int) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def _accuracy(a: float | None) -> str:
    """Accuracies are top-1 percentages (0-100), as the pipeline's evaluation reports them."""
    if a is None:
        return "unknown (no --data)"
    return f"{a:.2f}%"


def _checks_sentence(control: Mapping[str, Any]) -> str:
    """The final benchmark's checks (bench.benchmark_controlled's record) as one paragraph of report.md."""
    runs, kept, tol = control["runs"], control["kept"], control["tolerance"]
    several = len(runs) > 1
    out = []
    if control.get("pair"):
        base, twin = control["pair"]
        out.append(f"Control: {twin} runs {base}'s kernels, so their p50s should agree; {twin} / {base} measured "
                   + ", ".join(f"{r['control_ratio']:.3f}" for r in runs) + ".")
    if all(r.get("paired_speedups") for r in runs):
        out.append("Each speedup was also read round by round (the median of each interleaved round's ratio), "
                   "which matches the p50s' ratio unless the machine changed speed during the run: "
                   + "; ".join(", ".join(f"{n} {r['speedups'][n]:.3f}x / {v:.3f}x" for n, v in
                                         r["paired_speedups"].items()) for r in runs) + ".")
    out.append(f"{len(runs)} interleaved runs (tolerance ±{tol:.0%} on each check); run {kept + 1} was kept, and "
               "every number on this page is from it." if several else f"Within ±{tol:.0%}.")
    return " ".join(out)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def verdict(report: Mapping[str, Any]) -> str:
    """One line that answers "did pruning make it faster?" from a report's variants.

    Example: ``structured: 3.7x faster at 27% of the MACs; unstructured at the same non-zero count: 1.0x —
    dense kernels do not skip zeros``. Speedups within ±10% of 1.0 are called "no measurable speedup"; failed
    parity checks are appended as a warning.

    Args:
        report: a report dict with ``variants`` (kinds ``dense``/``unstructured``/``structured``).

    Returns:
        The verdict sentence (no trailing period).
    """
    v = _by_kind(report)
    dense, st, un = v.get("dense"), v.get("structured"), v.get("unstructured")
    parts: list[str] = []
    target = report.get("target")
    if isinstance(target, Mapping) and "achieved" in target:
        unit = "x" if target["kind"] == "speedup" else " ms"
        parts.append(f"target {target['value']:g}{unit}: measured {target['achieved']:.3g}{unit}, "
                     f"{'met' if target['met'] else 'NOT met'} ({len(target.get('probes', []))} probes)")
    if st is not None:
        sp = float(st["speedup_vs_dense"])
        macs = f"{100 * st['macs'] / dense['macs']:.0f}% of the MACs" if dense and dense.get("macs") else "fewer MACs"
        if sp >= 1 + _NOISE:
            parts.append(f"structured: {_x(sp)} faster at {macs}")
        elif sp <= 1 - _NOISE:
            parts.append(f"structured: {_x(sp)}, slower than dense at {macs}")
        else:
            parts.append(
                f"structured: {_x(sp)} at {macs}, no measurable speedup "
                "(channel counts that miss the kernels' block size run at the padded size)"
            )
        if dense and dense.get("accuracy") is not None and st.get("accuracy") is not None:
            parts[-1] += f", accuracy {_accuracy(dense['accuracy'])} → {_accuracy(st['accuracy'])}"
    if un is not None:
        sp = float(un["speedup_vs_dense"])
        if abs(sp - 1) < _NOISE:
            parts.append(f"unstructured at the same non-zero count: {_x(sp)} — dense kernels do not skip zeros")
        else:
            parts.append(f"unstructured at the same non-zero count: {_x(sp)}")
    parts += _int8_verdict(report)
    failed = [x["kind"] for x in _ordered(report) if not x.get("parity", {}).get("ok", True)]
    if failed:
        parts.append(f"WARNING: ONNX parity failed for {', '.join(failed)}")
    return "; ".join(parts) if parts else "no variants to compare"


def _int8_verdict(report: Mapping[str, Any]) -> list[str]:
    """The int8 variant's part of the verdict: its speed against fp32 structured, or why it has none."""
    v = _by_kind(report)
    q, st = v.get("int8"), v.get("structured")
    if q is None or st is None:
        return []
    details = (report.get("variant_details") or {}).get("int8") or {}
    agree = q.get("parity", {}).get("top1_agreement")
    agreement = f"top-1 agreement with fp32 {100 * agree:.1f}%" if agree is not None else "top-1 agreement unknown"
    latency = details.get("latency") or {}
    if latency.get("meaningful") is False:
        return [f"int8: {agreement}; latency not meaningful on {report['environment']['provider']} (no INT8 "
                "convolution kernels)"]
    ratio = float(st["latency_ms"]["p50"]) / float(q["latency_ms"]["p50"])
    if ratio >= 1 + _NOISE:
        speed = f"{_x(ratio)} faster than fp32 structured"
    elif ratio <= 1 - _NOISE:
        speed = f"{_x(ratio)}, slower than fp32 structured"
    else:
        speed = f"{_x(ratio)} vs fp32 structured, no measurable speedup"
    return [f"int8: {speed}, {agreement}"]


def _int8_rows(report: Mapping[str, Any]) -> list[str]:
    """The int8 variant: how it was quantized and calibrated, and how it compares with fp32 structured."""
    details = (report.get("variant_details") or {}).get("int8")
    q = _by_kind(report).get("int8")
    if not isinstance(details, Mapping) or q is None:
        return []
    quant, par, lat = details.get("quantization") or {}, details.get("parity") or {}, details.get("latency") or {}
    cal = quant.get("calibration") or {}
    lines = ["", "## INT8", "",
             f"{quant.get('tool', 'ONNX Runtime static quantization')}: {quant.get('format')} format, activations "
             f"{quant.get('activation_type')}, weights {quant.get('weight_type')}"
             f"{' per channel' if quant.get('per_channel') else ''}, reduce_range={quant.get('reduce_range')} "
             f"({quant.get('reduce_range_reason', '')}). Calibration: {cal.get('method')} on {cal.get('images')} "
             f"{cal.get('split')} images.", ""]
    agree = q["parity"].get("top1_agreement")
    if agree is not None:
        lines.append(f"Top-1 agreement with the fp32 structured model: **{100 * agree:.2f}%** of "
                     f"{par.get('images', '?')} {par.get('split', 'val')} images (needed: "
                     f"{100 * float(par.get('min_top1_agreement', 0)):.0f}%); accuracy {_accuracy(q['accuracy'])} "
                     f"(fp32 structured on ONNX Runtime: {_accuracy(par.get('fp32_accuracy'))}); largest logit "
                     f"difference {q['parity']['max_abs_diff']:.3g}.")
    if lat.get("meaningful") is False:
        lines += ["", f"**The int8 latency above is not meaningful:** {lat.get('reason', '')}."]
    nodes = quant.get("qdq_nodes")
    if isinstance(nodes, Mapping) and nodes:
        lines += ["", "Quantization nodes in the file: " + ", ".join(f"{k} {n}" for k, n in sorted(nodes.items()))
                  + "."]
    return lines


# ----------------------------------------------------------------------------------------------------------
# plots


def _samples_for(variant: Mapping[str, Any], bench: BenchResult) -> list[float] | None:
    """The bench samples of a variant: looked up by kind, then by the ONNX file's name or stem."""
    onnx = str(variant.get("onnx", ""))
    for key in (variant.get("kind"), Path(onnx).stem, Path(onnx).name, onnx):
        if key in bench.samples:
            return bench.samples[key]
    return None


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_latency(path: Path, variants: Sequence[Mapping[str, Any]], bench: BenchResult) -> None:
    """Left: per-run latency distribution per variant (box plot); right: p50 bars with speedup labels."""
    fig = _new_figure(10, 4.2)
    ax_box, ax_bar = fig.subplots(1, 2)
    kinds = [v["kind"] for v in variants]
    colors = [variants_mod.color(k) for k in kinds]

    data = [_samples_for(v, bench) or [v["latency_ms"]["p50"]] for v in variants]
    box = ax_box.boxplot(data, patch_artist=True, showfliers=True, flierprops={"markersize": 2, "alpha": 0.5})
    for patch, color in zip(box["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.6)
    ax_box.set_xticks(range(1, len(kinds) + 1), kinds)
    ax_box.set_ylabel("latency per run (ms)")
    ax_box.set_title(f"per-run latency (n={variants[0]['latency_ms']['n'] if variants else 0} each)")
    ax_box.set_ylim(bottom=0)
    ax_box.grid(axis="y", alpha=0.3)

    p50 = [float(v["latency_ms"]["p50"]) for v in variants]
    bars = ax_bar.bar(kinds, p50, color=colors, alpha=0.8)
    for bar, v in zip(bars, variants):
        ax_bar.annotate(
            f"{_ms(v['latency_ms']['p50'])} ms\n{_x(float(v['speedup_vs_dense']))}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax_bar.set_ylabel("p50 latency (ms)")
    ax_bar.set_title("p50 latency and speedup vs dense")
    fig.suptitle(f"ONNX Runtime latency on {bench.provider}, input {'x'.join(map(str, bench.input_shape))}")
    ax_bar.set_ylim(0, max(p50, default=1) * 1.25)
    ax_bar.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _plot_latency_vs_macs(path: Path, variants: Sequence[Mapping[str, Any]], bench: BenchResult) -> None:
    """p50 against MACs: structured moves down with the MACs, unstructured stays at the dense latency."""
    fig = _new_figure(7, 4.8)
    ax = fig.subplots()
    dense = next((v for v in variants if v["kind"] == "dense"), None)
    # dense and unstructured usually sit on the same spot (that is the point of the plot): distinct markers
    # and label offsets keep both readable.
    style = {
        "dense": {"marker": "s", "s": 150, "facecolors": "none", "offset": (-10, -24), "ha": "right"},
        "unstructured": {"marker": "o", "s": 60, "offset": (10, 8), "ha": "left"},
    }
    default = {"marker": "o", "s": 70, "offset": (10, 4), "ha": "left"}
    for v in variants:
        st = style.get(v["kind"], default)
        color = variants_mod.color(v["kind"])
        macs, p50 = v["macs"] / 1e6, float(v["latency_ms"]["p50"])
        face = st.get("facecolors", color)
        ax.scatter([macs], [p50], s=st["s"], marker=st["marker"], facecolors=face, edgecolors=color, lw=2, zorder=3)
        ax.annotate(
            f"{v['kind']}: {_x(float(v['speedup_vs_dense']))}\n{_human(v['nonzero_params'])} non-zero params",
            (macs, p50),
            textcoords="offset points",
            xytext=st["offset"],
            ha=st["ha"],
            fontsize=8,
            color=color,
        )
    max_macs = max((v["macs"] / 1e6 for v in variants), default=1.0)
    max_p50 = max((float(v["latency_ms"]["p50"]) for v in variants), default=1.0)
    if dense is not None and dense["macs"] > 0:
        d_macs, d_p50 = dense["macs"] / 1e6, float(dense["latency_ms"]["p50"])
        ax.axhline(d_p50, color=variants_mod.color("dense"), ls="--", lw=1, label="dense latency")
        # What latency would be if it scaled with MACs: the naive expectation a FLOP count suggests.
        ax.plot([0, d_macs * 1.3], [0, d_p50 * 1.3], color="k", ls=":", lw=1, label="latency ∝ MACs")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, max_macs * 1.3)
    ax.set_ylim(0, max_p50 * 1.3)
    ax.set_xlabel("MACs per input batch (millions)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"latency vs MACs on {bench.provider}: fewer non-zeros ≠ faster")
    ax.grid(alpha=0.3)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------------------
# markdown


def _cleanup_rows(cleanup: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """Accept one cleanup result (``{"nodes_before", ...}``) or a mapping of variant name → result."""
    if not isinstance(cleanup, Mapping) or not cleanup:
        return []
    if "nodes_before" in cleanup:
        return [("model", cleanup)]
    return [(str(k), c) for k, c in cleanup.items() if isinstance(c, Mapping) and "nodes_before" in c]


def _skipped_rows(skipped: Any) -> list[tuple[str, str]]:
    """Accept ``{name: reason}``, ``[{"name", "reason"}]`` or ``[name, ...]``."""
    if isinstance(skipped, Mapping):
        return [(str(k), str(r)) for k, r in skipped.items()]
    rows: list[tuple[str, str]] = []
    for item in skipped or []:
        if isinstance(item, Mapping):
            rows.append((str(item.get("name", "?")), str(item.get("reason", ""))))
        else:
            rows.append((str(item), ""))
    return rows


def _op_delta(c: Mapping[str, Any]) -> str:
    before, after = c.get("op_counts_before", {}), c.get("op_counts_after", {})
    changes = [f"{op} {before.get(op, 0)}→{after.get(op, 0)}" for op in sorted(set(before) | set(after))
               if before.get(op, 0) != after.get(op, 0)]
    return ", ".join(changes) if changes else "no change"


def _table(rows: list[Mapping[str, Any]]) -> list[str]:
    """A Markdown table from a list of flat dicts (the union of their keys, in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], (Mapping, list))]

    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        return _md_escape(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _target_rows(report: Mapping[str, Any]) -> list[str]:
    """The latency target: what was asked, what the final run measured, and every probe of the search."""
    t = report.get("target")
    if not isinstance(t, Mapping) or "achieved" not in t:
        return []
    unit = "x" if t["kind"] == "speedup" else " ms"
    band = (f"[{t['value']:g}x, {1.1 * t['value']:.3g}x]" if t["kind"] == "speedup" else
            f"[{t['value'] / 1.1:.3g} ms, {t['value']:g} ms]")
    lines = ["", "## Latency target", "",
             f"Asked: {t['value']:g}{unit}, met when the final interleaved run measures it in {band}. "
             f"Measured: **{t['achieved']:.3g}{unit}** ({'met' if t['met'] else 'not met'}). Channel widths were "
             f"chosen latency-aware from one-layer ONNX Runtime timings, then {len(t.get('probes', []))} "
             f"probe(s) were pruned, exported and timed against dense (docs/latency-target.md).", ""]
    what = "speedup" if t["kind"] == "speedup" else "p50 ms"
    probes = [{"probe": i + 1, "MACs": _human(p["macs"]), f"predicted {what}": p.get("predicted"),
               f"measured {what}": p["measured"]} for i, p in enumerate(t.get("probes", []))]
    return lines + _table(probes) if probes else lines


def _recipe_lines(report: Mapping[str, Any]) -> list[str]:
    """One line each on BatchNorm re-estimation and the finetuning recipe (or why they were skipped)."""
    out = []
    bn = report.get("bn_recalibration")
    if isinstance(bn, Mapping):
        if bn.get("done"):
            where = ", ".join(str(d.get("after")) for d in bn["done"])
            out.append(f"BatchNorm statistics re-estimated on {bn['done'][0].get('images')} training images "
                       f"({bn.get('batches')} batches) after: {where}; accuracy before finetuning is measured after it.")
        elif bn.get("skipped"):
            out.append(f"BatchNorm re-estimation skipped ({bn['skipped']}).")
    ft = report.get("finetune")
    if isinstance(ft, Mapping):
        kd = ft.get("distillation") or {}
        if ft.get("skipped"):
            out.append(f"Finetuning skipped ({ft['skipped']}).")
        else:
            distil = (f"distillation from dense (T={kd.get('temperature')}, alpha={kd.get('alpha')})"
                      if "temperature" in kd else f"no distillation ({kd.get('skipped')})")
            out.append(f"Finetuning: {ft.get('epochs')} epochs, {ft.get('optimizer')} lr {ft.get('lr')} "
                       f"(weight decay {ft.get('weight_decay')} on conv/linear weights only), {ft.get('schedule')} "
                       f"schedule with {ft.get('warmup_epochs')} warm-up epochs, {distil}.")
    return ["", *out] if out else []


def _schedule_rows(report: Mapping[str, Any]) -> list[str]:
    """The iterative schedule (``--steps``, the seed's Table 2) and lottery rounds, when the run had them."""
    lines: list[str] = []
    steps = report.get("schedule")
    if isinstance(steps, list) and steps:
        lines += ["", "## Pruning schedule", "", "Each step prunes, then finetunes (accuracy in %).", ""]
        lines += _table(steps)
    lottery = report.get("lottery")
    if isinstance(lottery, Mapping) and lottery.get("history"):
        lines += ["", "## Lottery ticket rounds", "",
                  "Iterative magnitude pruning: each round trains, prunes a share of the surviving weights and "
                  "rewinds the survivors.", ""]
        lines += _table(list(lottery["history"]))
        extra = {k: v for k, v in lottery.items() if k != "history" and not isinstance(v, (Mapping, list))}
        if extra:
            lines += [""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in extra.items()]
    return lines


def _markdown(
    report: Mapping[str, Any], bench: BenchResult, extras: Mapping[str, Any], plots: Iterable[str]
) -> str:
    def opt(key: str) -> Any:
        return extras.get(key, report.get(key))

    env = report["environment"]
    shape = "x".join(str(d) for d in report["input_shape"])
    lines = [
        f"# deploy-prune report: `{report['model']}` — {report['criterion']} pruning",
        "",
        f"Criterion **{report['criterion']}**, ratio {report['ratio']:g}, input {shape}, "
        f"provider {env['provider']}.",
        "",
        f"**Verdict:** {report.get('verdict') or verdict(report)}",
        "",
        "## Variants",
        "",
        "| kind | file | params | non-zero | MACs | ONNX size | p50 ms | p90 ms | p99 ms | speedup | accuracy "
        "| parity max\\|Δ\\| | parity |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for v in _ordered(report):
        lat, par = v["latency_ms"], v["parity"]
        lines.append(
            f"| {v['kind']} | `{_md_escape(Path(v['onnx']).name)}` | {v['params']:,} | {v['nonzero_params']:,} "
            f"| {_human(v['macs'])} | {_bytes(v['onnx_bytes'])} | {_ms(lat['p50'])} | {_ms(lat['p90'])} "
            f"| {_ms(lat['p99'])} | {_x(float(v['speedup_vs_dense']))} | {_accuracy(v['accuracy'])} "
            f"| {par['max_abs_diff']:.2e} | {'ok' if par['ok'] else '**FAILED**'} |"
        )
    outs = report.get("outputs") or []
    if len(outs) > 1 or (outs and outs[0].get("name") != "logits"):
        lines += ["", "Outputs (the same names and shapes in every variant): " + ", ".join(
            f"`{_md_escape(o['name'])}` {'x'.join(map(str, o['shape']))}" for o in outs) + "."]
    before_ft = opt("accuracy_before_finetune")
    if isinstance(before_ft, Mapping):
        shown = ", ".join(f"{k} {_accuracy(a)}" for k, a in before_ft.items() if a is not None)
        if shown:
            lines += ["", f"Accuracy before finetuning: {shown}."]
    elif isinstance(before_ft, (int, float)):
        lines += ["", f"Accuracy before finetuning: {_accuracy(float(before_ft))}."]
    lines += _recipe_lines(report)

    cleanup = _cleanup_rows(opt("cleanup"))
    if cleanup:
        lines += [
            "",
            "## ONNX cleanup",
            "",
            "onnx-graphsurgeon constant folding, Identity removal and dead-node cleanup. This is tidiness, not "
            "speed: ONNX Runtime applies the same rewrites when it loads a model.",
            "",
            "| model | nodes before | nodes after | op changes |",
            "|---|---:|---:|---|",
        ]
        lines += [
            f"| {_md_escape(name)} | {c['nodes_before']} | {c['nodes_after']} | {_op_delta(c)} |" for name, c in cleanup
        ]
        protected = max((int(c.get("maxpools_protected") or 0) for _, c in cleanup), default=0)
        if protected:
            lines += ["", f"{protected} MaxPool(s) after a zero Pad were given `auto_pad=VALID`, so that ONNX "
                      "Runtime's PadFusion does not fold the zero padding into them: MaxPool pads with -inf, "
                      "and the fusion changes the result (docs/onnx-runtime.md)."]

    lines += _target_rows(report)
    lines += _schedule_rows(report)
    lines += _int8_rows(report)

    layers = report.get("layers", [])
    lines += ["", "## Pruned layers", ""]
    if layers:
        lines += ["| layer | out channels before → after | kept |", "|---|---|---:|"]
        for layer in layers[:_MAX_LAYER_ROWS]:
            b, a = layer["out_channels_before"], layer["out_channels_after"]
            lines.append(f"| `{_md_escape(layer['name'])}` | {b} → {a} | {100 * a / b:.0f}% |")
        if len(layers) > _MAX_LAYER_ROWS:
            lines += ["", f"Showing the first {_MAX_LAYER_ROWS} of {len(layers)} layers; report.json lists all."]
    else:
        lines.append("No layer was pruned.")

    skipped = _skipped_rows(opt("skipped_layers"))
    if skipped:
        lines += ["", "## Layers left alone", "", "| layer | reason |", "|---|---|"]
        lines += [f"| `{_md_escape(n)}` | {_md_escape(r)} |" for n, r in skipped]

    notes = opt("notes")
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in ([notes] if isinstance(notes, str) else notes)]

    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    lines.append(f"| execution provider (what really ran) | {env['provider']} |")
    lines.append(f"| onnxruntime | {env['onnxruntime']} |")
    lines.append(f"| torch | {env['torch']} |")
    lines.append(f"| intra-op threads | {env['intra_op_threads']} |")
    for key, value in env.items():
        if key not in ("provider", "onnxruntime", "torch", "intra_op_threads"):
            lines.append(f"| {_md_escape(key)} | {_md_escape(value)} |")
    method = (report.get("bench") or {}).get("method") or bench.method
    lines += ["", f"How the benchmark ran: {method}"]
    control = (report.get("bench") or {}).get("control")
    if isinstance(control, Mapping) and control.get("runs"):
        lines += ["", _checks_sentence(control)]

    lines += ["", "## Plots", ""]
    for p in plots:
        lines += [f"![{Path(p).stem}]({p})", ""]

    lines += [
        "",
        "## How to read this report",
        "",
        "- **Latency** is per inference of one input batch; p50 is the median of the kept runs. **Speedup** is "
        "dense p50 ÷ variant p50, all variants measured in the same interleaved run. Differences of a few "
        "percent are within run-to-run noise.",
        "- **Unstructured** pruning zeroes individual weights but keeps every tensor's shape, so the file is the "
        "same size and dense kernels multiply the zeros anyway: expect dense latency at a lower non-zero count.",
        "- **Structured** pruning removes whole channels, so tensors, MACs and the file shrink. The speedup also "
        "depends on channel counts fitting the kernels' block sizes (multiples of 8 or 16).",
        "- **Parity** compares ONNX Runtime with PyTorch on the same inputs (max |Δ|; ok means within 1e-3 "
        "relative to the output's magnitude). Accuracy is unknown unless the run was given `--data`.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# entry point

# Optional extras copied into report.json when the report does not carry them already.
_EXTRA_KEYS = ("cleanup", "accuracy_before_finetune", "skipped_layers", "notes")


def write_report(
    out_dir: Path, report: Mapping[str, Any], bench: BenchResult, extras: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``latency_samples.json`` and the plots into ``out_dir``.

    The caller's ``report`` is not modified. The written ``report.json`` adds ``verdict`` (from
    :func:`verdict` unless given), ``bench`` (how the latencies were measured) and the optional extras
    ``cleanup``, ``accuracy_before_finetune``, ``skipped_layers`` and ``notes``; it is validated first.

    Args:
        out_dir: the folder (created if needed).
        report: the report per ``report.schema.json`` (extra keys allowed).
        bench: the benchmark run the latencies came from (its raw samples feed the box plot).
        extras: optional ``cleanup`` (one :func:`~deploy_prune.export.cleanup_onnx` result or a mapping of
            variant → result), ``accuracy_before_finetune`` (number or mapping), ``skipped_layers``
            (``{name: reason}`` or a list), ``notes`` (list of strings) and ``plots`` (names of extra PNG
            files already in ``out_dir`` to embed).

    Returns:
        The paths written, ``report.json`` first.

    Raises:
        DeployPruneError: the report fails validation or holds values JSON cannot represent (NaN, inf).
    """
    out_dir = Path(out_dir)
    extras = dict(extras or {})
    rep: dict[str, Any] = copy.deepcopy(dict(report))
    for key in _EXTRA_KEYS:
        if key in extras and key not in rep:
            rep[key] = copy.deepcopy(extras[key])
    bench_info = dict(rep.get("bench") or {})
    for key, value in bench.to_dict().items():
        if key != "latency_ms":
            bench_info.setdefault(key, value)
    rep["bench"] = bench_info
    validate_report(rep)
    rep.setdefault("verdict", verdict(rep))

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        report_json = json.dumps(rep, indent=2, allow_nan=False)
        samples_json = json.dumps(
            {"unit": "ms", "provider": bench.provider, "samples": bench.samples}, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise DeployPruneError(f"report cannot be written as JSON: {exc}") from exc

    written: list[Path] = []
    for name, text in (("report.json", report_json + "\n"), ("latency_samples.json", samples_json + "\n")):
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)

    variants = _ordered(rep)
    _plot_latency(out_dir / "latency.png", variants, bench)
    _plot_latency_vs_macs(out_dir / "latency_vs_macs.png", variants, bench)
    plots = ["latency.png", "latency_vs_macs.png"]
    written += [out_dir / p for p in plots]
    plots += [str(p) for p in extras.get("plots", []) if str(p) not in plots]

    md = out_dir / "report.md"
    md.write_text(_markdown(rep, bench, extras, plots), encoding="utf-8")
    written.insert(1, md)
    return written
