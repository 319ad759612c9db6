"""The ``deploy-prune`` command line (typer). Commands parse options, call the library, and map errors to exit
codes: 0 success, 2 bad input (one line ``error: ...`` on stderr, no traceback), 1 internal failure."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.exceptions import Abort, Exit, TyperException

from deploy_prune import criteria, variants
from deploy_prune.errors import BadInput, DeployPruneError, is_out_of_memory, out_of_memory

app = typer.Typer(
    name="deploy-prune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Prune a PyTorch CNN, finetune it, export dense / unstructured / structured variants to ONNX, verify "
         "them against PyTorch and measure their latency on ONNX Runtime.",
)

_DEBUG = {"on": False}


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    from deploy_prune.spec import parse_shape

    return parse_shape(text) if text else None


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    _DEBUG["on"] = debug


def _run_template(
    model: Annotated[str, typer.Argument(help="torchvision:NAME, torchvision:segmentation.NAME, "
                                              "torchvision:detection.NAME.backbone, timm:NAME (pip install "
                                              "'deploy-prune[timm]'), builtin:NAME, or a .pt/.pth checkpoint "
                                              "(state_dict, {'arch','state_dict'} or a deploy-prune pruned.pt).")],
    criterion: Annotated[str, typer.Option(help="Criterion: " + "; ".join(
        f"{n}: {criteria.get(n).summary}" for n in criteria.names()) + ".")] = "l1",
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of prunable channels to remove, 0 <= R < 1 "
                                                        "(lottery: fraction of weights). Default 0.5 unless a "
                                                        "target is given.")] = None,
    target_speedup: Annotated[Optional[float], typer.Option(
        help="Instead of --ratio: prune until the structured model's p50, measured on this run's provider, "
             "threads and input shape in deploy-prune's interleaved ONNX Runtime benchmark, is X times faster "
             "than dense (within X..1.1X). Channel widths are chosen latency-aware from measured one-layer "
             "tables (cached), then corrected by measuring whole-model probes.")] = None,
    target_latency: Annotated[Optional[float], typer.Option(
        help="Instead of --ratio: the same, as an absolute structured p50 in milliseconds (within MS/1.1..MS).")]
    = None,
    weights: Annotated[Optional[str], typer.Option(help="A state_dict for a torchvision:/timm:/builtin: "
                                                        "MODEL.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture of a bare state_dict file "
                                                     "(torchvision:NAME, timm:NAME or builtin:NAME); "
                                                     "torchvision/builtin ones are guessed if omitted.")] = None,
    data: Annotated[Optional[str], typer.Option(help="mnist5k (embedded digits) or imagefolder:DIR "
                                                     "(DIR/train, DIR/val). Without it: no finetuning, accuracy unknown.")] = None,
    workers: Annotated[int, typer.Option(help="imagefolder: DataLoader worker processes decoding images "
                                              "(0 = in the main process; docs/data.md).")] = 0,
    image_size: Annotated[Optional[int], typer.Option(help="imagefolder: square crop size (training "
                                                           "RandomResizedCrop, evaluation resize + centre crop); "
                                                           "sets the input shape's H and W. Default 224.")] = None,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", help="imagefolder: skip unreadable images "
                                                                             "(the report counts them) instead of "
                                                                             "failing.")] = False,
    epochs: Annotated[int, typer.Option(help="Finetune epochs after pruning (per step).")] = 3,
    no_finetune: Annotated[bool, typer.Option("--no-finetune", help="Skip finetuning (same as --epochs 0).")] = False,
    input_shape: Annotated[Optional[str], typer.Option(help="e.g. 1x3x224x224 (default: from the data or the "
                                                            "model, else 1x3x224x224).")] = None,
    provider: Annotated[str, typer.Option(help="auto (CUDA if it really runs, else CPU) | cpu | cuda.")] = "auto",
    out: Annotated[Path, typer.Option(help="Bundle directory; must be empty unless --force.")] = Path("deploy-prune-out"),
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled whole module "
                                                                       "(runs code from the file).")] = False,
    bench_iters: Annotated[int, typer.Option(help="Timed iterations per variant (at least; see "
                                                  "--bench-min-seconds).")] = 100,
    bench_min_seconds: Annotated[float, typer.Option(help="Raise the iterations until each variant is timed for "
                                                          "at least this long: a sub-millisecond model timed 100 "
                                                          "times is timed for a few ms, and its speedup varies "
                                                          "by several % from run to run. 0 = exactly "
                                                          "--bench-iters.")] = 0.5,  # spec.BENCH_MIN_SECONDS
    bench_target_seconds: Annotated[float, typer.Option(
        help="With --target-speedup/--target-latency: raise the iterations until the final benchmark, which "
             "decides whether the target is met, runs at least this long in all (more rounds average out a shared "
             "machine's slow spells); the search's confirming timing of the probe it stops on runs a quarter "
             "as long. 0 = no floor.")] = 60.0,  # spec.TARGET_BENCH_SECONDS
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads (default: all cores).")] = None,
    round_to: Annotated[Optional[str], typer.Option(
        help="Round kept channel counts to a multiple of N (8 suits AVX2 CPUs and tensor cores, 16 AVX-512), or "
             "auto: time one-layer models on this provider and pick the step that pays. Default: auto with a "
             "latency target, else 8.", show_default=False)] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer (qualified name, or prefix ending in '.') "
                                                             "never to prune; repeatable.")] = None,
    max_layer_ratio: Annotated[float, typer.Option(help="Never remove more than this fraction of a layer.")] = 0.9,
    scope: Annotated[Optional[str], typer.Option(help="local: remove --ratio of every layer group; global: one "
                                                      "threshold over all groups (default: the criterion's own; "
                                                      "slimming is global).")] = None,
    steps: Annotated[int, typer.Option(help="Prune and finetune iteratively in N steps (1 = prune once).")] = 1,
    allocation: Annotated[str, typer.Option(help="With a target: how widths are shared out between layer groups. "
                                                 "latency: importance x MACs per measured ms; importance: "
                                                 "importance per ms; uniform: the same fraction everywhere; auto: "
                                                 "with --data, search each for the target and keep the most "
                                                 "accurate after BatchNorm re-estimation (EagleEye), else "
                                                 "latency, trying uniform, then importance, when its measured "
                                                 "speeds jump past the band's middle, and uniform's points "
                                                 "keeping more MACs against an in-band latency model (the most "
                                                 "MACs in the band wins).")] = "auto",
    from_sensitivity: Annotated[Optional[Path], typer.Option(help="Per-layer ratios from a sensitivity.json "
                                                                  "(deploy-prune sensitivity).")] = None,
    max_drop: Annotated[float, typer.Option(help="With --from-sensitivity: accuracy points a layer may lose.")] = 1.0,
    lr: Annotated[Optional[float], typer.Option(help="Finetune base learning rate (default 2e-3 for adamw, 1e-3 "
                                                     "for adam, 1e-2 for sgd).")] = None,
    optimizer: Annotated[str, typer.Option(help="Finetune optimizer: adamw (decoupled weight decay), adam, or sgd "
                                                "(momentum 0.9). Weight decay never applies to biases or norm "
                                                "parameters.")] = "adamw",
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay on conv/linear weights (default "
                                                               "1e-2 adamw, 0 adam, 1e-4 sgd).")] = None,
    lr_schedule: Annotated[str, typer.Option(help="cosine: decay the LR to 0 over each finetuning run (after the "
                                                  "warm-up); constant: keep it.")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option(help="Linear LR warm-up at the start of each finetuning run, in "
                                                      "epochs (at most half the run; 0 = none).")] = 0.3,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Finetune on the labels only. By default, "
                                             "with --data, the pruned models also learn the dense model's "
                                             "softened outputs (knowledge distillation, Hinton et al. 2015).")]
    = False,
    distill_temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 4.0,
    distill_alpha: Annotated[float, typer.Option(help="Weight of the distillation term: loss = alpha*T^2*KL + "
                                                      "(1-alpha)*cross-entropy.")] = 0.5,
    bn_recalib_batches: Annotated[int, typer.Option(help="After every surgery, re-estimate BatchNorm running "
                                                         "statistics on N training batches (no gradient steps; "
                                                         "EagleEye's adaptive BN) before the model is evaluated "
                                                         "or finetuned. 0 = off, and with it the classifier refit "
                                                         "(--no-head-refit), which uses the same batches; "
                                                         "skipped without --data.")] = 50,
    no_head_refit: Annotated[bool, typer.Option("--no-head-refit", help="Keep the classifier's weights after "
                                                "surgery. By default, on the same batches as the BatchNorm "
                                                "re-estimation, the classifier (the Linear layer producing "
                                                "the output, or one whose inputs were narrowed) is refit by "
                                                "least squares to the dense model's outputs (He et al. 2017), "
                                                "kept only where it reconstructs them better.")] = False,
    batch_size: Annotated[int, typer.Option(help="Batch size for finetuning, evaluation and BatchNorm "
                                                 "re-estimation.")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run with the same arguments "
                                                          "and --out from its last completed training epoch.")] = False,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="Under torchrun on GPUs: synchronise BatchNorm "
                                                            "statistics across ranks while training "
                                                            "(SyncBatchNorm).")] = False,
) -> None:
    """The fixed options of `run` (the criterion options and optional variants are added from the registries)."""


_PY_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _registry_params() -> list[inspect.Parameter]:
    """One option per declared criterion option, and one flag per optional variant (``--int8``)."""
    out = []
    for name, (f, takers) in criteria.option_fields().items():
        typ = _PY_TYPES[f.type] if isinstance(f.type, str) else f.type
        help_text = f"{f.metadata['help']} Default {criteria.default_of(f)!r}."
        flag = "--" + name.replace("_", "-")
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=Annotated[Optional[typ], typer.Option(flag, help=help_text)]))
    for kind in variants.optional_kinds():
        v = variants.get(kind)
        out.append(inspect.Parameter(kind, inspect.Parameter.KEYWORD_ONLY, default=False,
                                     annotation=Annotated[bool, typer.Option(f"--{kind}", help=f"Add the {kind} "
                                                                             f"variant: {v.description}.")]))
        for f in dataclasses.fields(v.Options) if v.Options is not None else ():
            typ = _PY_TYPES[f.type] if isinstance(f.type, str) else f.type
            help_text = f"{f.metadata['help']} Default {criteria.default_of(f)!r}."
            out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                         annotation=Annotated[Optional[typ], typer.Option(
                                             "--" + f.name.replace("_", "-"), help=help_text)]))
    return out


def _variant_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Each optional variant's options from the flags given (a variant option without its variant is refused)."""
    out = {}
    for kind in variants.optional_kinds():
        cls = variants.get(kind).Options
        given = {f.name: kw[f.name] for f in dataclasses.fields(cls) if kw.get(f.name) is not None} if cls else {}
        if given and not kw.get(kind):
            raise BadInput(f"--{next(iter(given)).replace('_', '-')} is an option of the {kind} variant: add --{kind}")
        if kw.get(kind):
            out[kind] = variants.make_options(kind, given)
    return out


def run(**kw: Any) -> None:
    """Prune MODEL, finetune, export the variants to ONNX, verify and benchmark them, and write the bundle."""
    from deploy_prune import distributed
    from deploy_prune.pipeline import run as run_pipeline

    distributed.init(sync_bn=kw["sync_bn"])  # torchrun: join the process group (no-op otherwise)
    spec = _run_spec(kw)
    report = run_pipeline(spec)
    if report is not None:  # None on the ranks other than 0, which write nothing
        _summary(report, spec.out)


def _run_spec(kw: dict[str, Any]) -> Any:
    """Turn the parsed options of `run` into a RunSpec (every check happens in the spec's constructors)."""
    from deploy_prune.spec import BenchSpec, ModelSource, PruneSpec, RunSpec, Target, TrainSpec, default_round_to

    layer_ratios: dict[str, float] = {}
    if kw["from_sensitivity"] is not None:
        from deploy_prune.sensitivity import ratios_from_sensitivity

        try:
            layer_ratios = ratios_from_sensitivity(_read_json(kw["from_sensitivity"], "--from-sensitivity"),
                                                   max_drop=kw["max_drop"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BadInput(f"--from-sensitivity {kw['from_sensitivity']} is not a `deploy-prune sensitivity` "
                           "result; regenerate it with deploy-prune sensitivity") from None
    given = {n: kw[n] for n in criteria.option_fields() if kw.get(n) is not None}
    options = criteria.make_options(kw["criterion"], given)
    targets = [(k, kw[f"target_{k}"]) for k in ("speedup", "latency") if kw[f"target_{k}"] is not None]
    if len(targets) + (kw["ratio"] is not None) > 1:
        raise BadInput("--ratio, --target-speedup and --target-latency exclude each other; give one of them")
    target = Target("speedup" if targets[0][0] == "speedup" else "latency_ms", targets[0][1]) if targets else None
    round_to: int | str = default_round_to(target) if kw["round_to"] is None else kw["round_to"].strip().lower()
    if isinstance(round_to, str) and round_to != "auto":
        try:
            round_to = int(round_to)
        except ValueError:
            raise BadInput(f"--round-to {kw['round_to']!r} is not a number: give N >= 1 or auto") from None
    prune = PruneSpec(criterion=kw["criterion"], options=options, ratio=kw["ratio"], target=target,
                      layer_ratios=layer_ratios, round_to=round_to, max_layer_ratio=kw["max_layer_ratio"],
                      scope=kw["scope"], ignore=tuple(kw["ignore"] or ()), steps=kw["steps"], seed=kw["seed"],
                      allocation=kw["allocation"].strip().lower())
    return RunSpec(
        model=ModelSource(spec=kw["model"], weights=kw["weights"], arch=kw["arch"], trust_pickle=kw["trust_pickle"]),
        prune=prune,
        train=TrainSpec(epochs=0 if kw["no_finetune"] else kw["epochs"], lr=kw["lr"], batch_size=kw["batch_size"],
                        optimizer=kw["optimizer"], weight_decay=kw["weight_decay"], lr_schedule=kw["lr_schedule"],
                        warmup_epochs=kw["warmup_epochs"], distill=not kw["no_distill"],
                        distill_temperature=kw["distill_temperature"], distill_alpha=kw["distill_alpha"],
                        bn_recalib_batches=kw["bn_recalib_batches"], head_refit=not kw["no_head_refit"]),
        bench=BenchSpec(provider=kw["provider"], iters=kw["bench_iters"], threads=kw["threads"],
                        min_seconds=kw["bench_min_seconds"], target_seconds=kw["bench_target_seconds"]),
        data=kw["data"], workers=kw["workers"], image_size=kw["image_size"], skip_bad_images=kw["skip_bad_images"],
        input_shape=_shape(kw["input_shape"]), out=kw["out"], force=kw["force"],
        variants=tuple(k for k in variants.optional_kinds() if kw.get(k)), variant_options=_variant_options(kw),
        progress=not kw["quiet"], resume=kw["resume"])


run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    list(inspect.signature(_run_template, eval_str=True).parameters.values()) + _registry_params())
app.command(no_args_is_help=True)(run)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Bundle directory.")] = Path("deploy-prune-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    bench_iters: Annotated[int, typer.Option(help="Timed iterations per variant.")] = 100,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """The whole pipeline on the embedded default: a small CNN trained on 4,000 real handwritten digits (mnist5k),
    L1-pruned at 50%, finetuned 3 epochs, benchmarked at batch 1 on this machine."""
    from deploy_prune.pipeline import run as run_pipeline
    from deploy_prune.spec import BenchSpec, ModelSource, PruneSpec, RunSpec, TrainSpec

    spec = RunSpec(model=ModelSource(spec="builtin:mnist_cnn"), prune=PruneSpec(criterion="l1", ratio=0.5),
                   train=TrainSpec(epochs=3), bench=BenchSpec(iters=bench_iters), data="mnist5k", out=out,
                   force=force, progress=not quiet)
    report = run_pipeline(spec)
    _summary(report, out)


@app.command(no_args_is_help=True)
def inspect(
    model: Annotated[str, typer.Argument(help="As for `run`.")],
    weights: Annotated[Optional[str], typer.Option(help="A state_dict for a torchvision:/timm:/builtin: "
                                                        "MODEL.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture of a bare state_dict file "
                                                     "(torchvision:NAME, timm:NAME, builtin:NAME).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="e.g. 1x3x224x224.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled whole module.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the prunable channel groups, layers left alone (and why), MACs and params. Changes nothing."""
    from deploy_prune.loading import DEFAULT_INPUT_SHAPE, load_model
    from deploy_prune.metrics import count_macs, count_params
    from deploy_prune.surgery import analyze

    loaded = load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle)
    shape = _shape(input_shape) or loaded.input_shape or DEFAULT_INPUT_SHAPE
    graph = analyze(loaded.model, shape)
    info = {
        "model": model, "arch": loaded.arch, "input_shape": list(shape), "params": count_params(loaded.model),
        "macs": count_macs(loaded.model, shape), "notes": loaded.notes,
        "groups": [{"id": g.id, "layers": list(g.modules), "channels": g.width,
                    "classes": g.size, "multiple_of": g.multiple_of,
                    "channels_per_class": g.channels_per_class}
                   for g in graph.groups],
        "skipped": graph.skipped,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{model}  input {'x'.join(map(str, shape))}  params {info['params']:,}  MACs {info['macs']:,}")
    for n in loaded.notes:
        typer.echo(f"  note: {n}")
    typer.echo(f"\n{len(graph.groups)} prunable channel groups:")
    for g in graph.groups:
        layers = ", ".join(g.modules[:4]) + (f" (+{len(g.modules) - 4} more)" if len(g.modules) > 4 else "")
        per = g.channels_per_class
        width = f"{g.width:>5} channels" + (f" (pruned in {g.size} sets of {per})" if per > 1 else "")
        typer.echo(f"  #{g.id:<3} {width}  {layers}")
    if graph.skipped:
        typer.echo(f"\n{len(graph.skipped)} layers not (fully) prunable:")
        for name, why in graph.skipped.items():
            typer.echo(f"  {name}: {why}")


@app.command(no_args_is_help=True)
def sensitivity(
    model: Annotated[str, typer.Argument(help="As for `run`.")],
    data: Annotated[str, typer.Option(help="mnist5k or imagefolder:DIR (required).")],
    criterion: Annotated[str, typer.Option(help="Channel ranking used for each layer (l1, fpgm, random).")] = "l1",
    weights: Annotated[Optional[str], typer.Option(help="A state_dict for a torchvision:/timm:/builtin: "
                                                        "MODEL.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture of a bare state_dict file "
                                                     "(torchvision:NAME, timm:NAME, builtin:NAME).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="e.g. 1x3x224x224.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for sensitivity.json and sensitivity.png.")] = Path("sensitivity-out"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing sensitivity files.")] = False,
    max_batches: Annotated[Optional[int], typer.Option(help="Evaluate on at most N validation batches.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled whole module.")] = False,
) -> None:
    """Prune each layer group alone at 10%..90% without retraining and plot accuracy against the pruned fraction
    (Li et al. 2017, Fig. 2b). Feed the JSON back with `run --from-sensitivity`."""
    from deploy_prune import distributed
    from deploy_prune.sensitivity import plot_sensitivity, sensitivity as sweep
    from deploy_prune.data import load_data
    from deploy_prune.loading import load_model

    distributed.init()  # torchrun: training and evaluation are shared by the ranks, rank 0 writes

    targets = [out / "sensitivity.json", out / "sensitivity.png"]
    if any(t.exists() for t in targets) and not force:
        raise BadInput(f"{out} already holds sensitivity results; pass --force to overwrite or choose another --out")
    loaded = load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle)
    bundle = load_data(data, input_shape=_shape(input_shape))
    shape = _shape(input_shape) or bundle.input_shape
    result = sweep(loaded.model, bundle, shape, criterion=criterion, max_batches=max_batches,
                   progress=distributed.is_main())
    if not distributed.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".sensitivity.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(targets[0])
    plot_sensitivity(result, targets[1])
    typer.echo(f"baseline accuracy {result['baseline']:.2f}%  ->  {targets[0]}  {targets[1]}")


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option(help="Folder for reproduce.json, reproduce.md and the plots.")] = Path("reproduce-out"),
    seeds: Annotated[Optional[int], typer.Option(help="Seeds to average over (default 2 with --quick, else 3).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Short settings: minutes on two CPU cores.")] = False,
    only: Annotated[Optional[str], typer.Option(help="Comma-separated experiments: sensitivity, l1_modes, schedules, "
                                                     "slimming_gamma, apoz_lenet, lottery, criteria.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    threads: Annotated[int, typer.Option(help="Torch threads for training (1 is fastest on a loaded machine).")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """The survey's experiments on the embedded digits (sensitivity, L1 modes, schedules, slimming, APoZ on LeNet,
    lottery tickets, every criterion at equal speedup), each result beside the paper's; see docs/reproduction.md."""
    from deploy_prune.reproduce import reproduce as run_reproduce

    result = run_reproduce(out, seeds=seeds, quick=quick, only=only, force=force, threads=threads,
                           say=(lambda _: None) if quiet else (lambda m: typer.echo(m, err=True)))
    for name in result["experiments"]:
        f = result[name]["finding"]
        typer.echo(f"{name:<15} {'holds' if f['holds'] else 'DOES NOT HOLD':<14} {f['measured']}")
    typer.echo(f"-> {out / 'reproduce.md'}")


@app.command(no_args_is_help=True)
def bench(
    files: Annotated[list[Path], typer.Argument(help="ONNX files to compare (the first is the baseline).")],
    input_shape: Annotated[Optional[str], typer.Option(help="e.g. 1x3x224x224 (default: from the first model, "
                                                            "dynamic dims = 1).")] = None,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    iters: Annotated[int, typer.Option(help="Timed iterations per file.")] = 100,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: all cores).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Interleaved latency comparison of ONNX files on ONNX Runtime (blocks, spinning off, same input)."""
    from deploy_prune.bench import bench_files

    result = bench_files(files, _shape(input_shape), provider=provider, iters=iters, threads=threads)
    names = list(result.stats)
    base = result.stats[names[0]].p50
    if as_json:
        typer.echo(json.dumps({"provider": result.provider, "threads": result.threads, "method": result.method,
                               "results": {n: result.stats[n].to_dict() | {"speedup_vs_first": base / result.stats[n].p50}
                                           for n in names}}, indent=2))
        return
    typer.echo(f"provider {result.provider}, {result.threads} threads; {result.method}")
    typer.echo(f"{'file':<40} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'speedup':>8}")
    for n in names:
        s = result.stats[n]
        typer.echo(f"{n:<40} {s.p50:>9.3f} {s.p90:>9.3f} {s.p99:>9.3f} {base / s.p50:>7.2f}x")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist; run `deploy-prune sensitivity` first") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{what} {path} is not readable JSON ({exc.__class__.__name__}); regenerate it") from None


def _summary(report: dict, out: Path) -> None:
    typer.echo(report.get("verdict", ""))
    for v in report["variants"]:
        acc = "n/a" if v["accuracy"] is None else f"{v['accuracy']:.2f}%"
        typer.echo(f"  {v['kind']:<13} p50 {v['latency_ms']['p50']:8.3f} ms  {v['speedup_vs_dense']:5.2f}x  "
                   f"MACs {v['macs']:>14,}  non-zero {v['nonzero_params']:>11,}  acc {acc}")
    typer.echo(f"bundle: {out}/ (model.onnx, pruned.pt, report.md, report.json)")


def _fail(message: str, code: int) -> None:
    """Print the one ``error:`` line and exit with ``code``. Under torchrun only the first rank to fail prints;
    the others exit quietly with that rank's code."""
    from deploy_prune import distributed

    if code == 130 and distributed.launched() and os.environ.get("RANK", "0") != "0":
        sys.exit(130)  # Ctrl-C reaches every rank: rank 0 says where the resumable state is
    if distributed.claim_error(code):
        print(f"error: {message}", file=sys.stderr, flush=True)
        distributed.error_printed()
    else:
        code = distributed.first_error_code(code)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the app and turns every failure into a one-line message and an exit code."""
    command = typer.main.get_command(app)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        # torchrun: join the process group first, so that every later failure, even a bad option, is reported
        # once through the group's store (deploy_prune.distributed)
        from deploy_prune import distributed

        try:
            distributed.init()
        except DeployPruneError as exc:
            _fail(exc.cli_message(), exc.exit_code)
        except Exception as exc:  # noqa: BLE001
            _fail(f"internal failure: could not join the torchrun process group: {type(exc).__name__}: "
                  f"{str(exc).strip()[:300]}", 1)
    try:
        # standalone_mode=False: typer turns a KeyboardInterrupt into Exit(130) and *returns* 130 (typer 0.29)
        rv = command.main(args=argv, prog_name="deploy-prune", standalone_mode=False)
    except Exit as exc:
        if exc.exit_code == 130:
            _fail("interrupted; nothing was written", 130)
        sys.exit(exc.exit_code)
    except Abort:
        _fail("interrupted; nothing was written", 130)
    except TyperException as exc:  # usage errors from the (vendored) click parser
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        name = getattr(ctx, "command_path", "deploy-prune") if ctx is not None else "deploy-prune"
        _fail(f"{exc.format_message()}; see `{name} --help`", 2)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except DeployPruneError as exc:
        if _DEBUG["on"]:
            traceback.print_exc()
        if exc.exit_code == 1 and is_out_of_memory(exc):  # e.g. the ONNX checker's std::bad_alloc, wrapped
            exc = out_of_memory(exc.__cause__ or exc)
        _fail(exc.cli_message(), exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback unless --debug
        if _DEBUG["on"]:
            traceback.print_exc()
        if is_out_of_memory(exc):
            _fail(out_of_memory(exc).cli_message(), 2)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"internal failure: {type(exc).__name__}: {first[:300]} (rerun with --debug for the traceback)", 1)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:  # an Exit typer returned instead of raising
        if rv == 130:
            _fail("interrupted; nothing was written", 130)
        sys.exit(rv)
    from deploy_prune import distributed

    distributed.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
