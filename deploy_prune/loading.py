"""Turning a MODEL argument into an ``nn.Module`` (the README's "MODEL" section lists the forms).

Files are always opened with ``torch.load(weights_only=True)`` first, which cannot run code. A pickled
whole module needs ``--trust-pickle``; without it the user gets a one-line error that says why and what to do.
"""

from __future__ import annotations

import difflib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deploy_prune import dense_models
from deploy_prune import models as zoo
from deploy_prune.errors import BadInput, DeployPruneError, opt
from deploy_prune.spec import PrunePlan

PRUNED_FORMAT = "deploy-prune/pruned/v2"  # v1 stored {layer: removed indices} as "prune_plan"
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass
class LoadedModel:
    """A model ready to prune.

    Attributes:
        model: the module, in eval mode, on CPU.
        arch: a rebuildable MODEL spec (``torchvision:NAME`` / ``timm:NAME`` / ``builtin:NAME``), or None for a
            trusted pickle.
        num_classes: the classifier width the architecture was built with.
        input_shape: the input shape the model is known to take (builtin models, pruned.pt), else None.
        notes: what the loader decided on the user's behalf (e.g. which architecture matched a state_dict).
        plan: the pruning plan when the file is a deploy-prune ``pruned.pt``.
    """

    model: nn.Module
    arch: str | None
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    plan: PrunePlan | None = None


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


TIMM_INSTALL = "pip install 'deploy-prune[timm]'"


def _timm() -> Any:
    """timm (an optional extra), or a one-line error that says how to install it."""
    try:
        import timm
    except ImportError:
        raise BadInput(f"timm:NAME models need timm, an optional extra: {TIMM_INSTALL} (or pip install timm)") \
            from None
    return timm


def timm_names() -> list[str]:
    """Every architecture timm can build (``timm.list_models()``); empty when timm is not installed."""
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def _build_timm(name: str, num_classes: int | None) -> tuple[nn.Module, tuple[int, ...] | None]:
    timm = _timm()
    arch = name.split(".", 1)[0]  # "resnet50.a1_in1k": the tag names pretrained weights; the arch is the same
    names = timm.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BadInput(f"unknown timm model {name!r}{hint}; `python -c 'import timm; print(timm.list_models())'` "
                       "lists them")
    kw: dict[str, Any] = {"pretrained": False}  # never download: weights come from --weights or a checkpoint
    if num_classes is not None:
        kw["num_classes"] = num_classes
    model = timm.create_model(arch, **kw)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return model.eval(), ((1, *size) if size else None)


def build_arch(arch: str, num_classes: int | None = None, *,
               keys: Any = None) -> tuple[nn.Module, tuple[int, ...] | None]:
    """Build ``torchvision:NAME``, ``timm:NAME`` or ``builtin:NAME`` with random init; returns (model, known input
    shape). ``torchvision:segmentation.NAME`` / ``torchvision:detection.NAME.backbone`` are built by
    :mod:`deploy_prune.dense_models`; ``keys``, the keys of the state_dict about to be loaded, say whether a
    segmentation model gets its auxiliary head."""
    kind, _, name = arch.partition(":")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "timm":
        return _build_timm(name, num_classes)
    if kind == "torchvision" and dense_models.is_dense(name):
        return dense_models.build(name, num_classes, keys), None
    if kind == "torchvision":
        import torchvision

        names = _torchvision_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            if name in dense_models.segmentation_names():
                hint = f" (a segmentation model: use torchvision:{dense_models.SEGMENTATION}{name})"
            elif name in dense_models.detection_names():
                hint = (f" (a detector: prune its backbone with "
                        f"torchvision:{dense_models.DETECTION}{name}{dense_models.BACKBONE})")
            raise BadInput(f"unknown torchvision classification model {name!r}{hint}; "
                           "`python -c 'import torchvision; print(torchvision.models.list_models())'` lists them")
        kwargs: dict[str, Any] = dict(kw, weights=None)
        if name.startswith(("inception", "googlenet")):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        return torchvision.models.get_model(name, **kwargs).eval(), None
    if kind == "builtin":
        if name not in zoo.names():
            raise BadInput(f"unknown builtin model {name!r}: choose one of {', '.join(zoo.names())}")
        entry = zoo.get(name)
        return entry.build(**kw).eval(), entry.input_shape
    raise BadInput(f"unknown model spec {arch!r}: use torchvision:NAME, timm:NAME, builtin:NAME or a path to a "
                   ".pt/.pth file")


def _load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:3]}")
        raise BadInput(f"{what} does not fit the architecture ({'; '.join(parts)}); pass the matching {opt('arch')}")
    model.load_state_dict(sd, strict=True)


def _classifier_width(sd: dict[str, torch.Tensor], arch: str | None = None) -> int | None:
    """The classifier's output width in the state_dict: for a timm ``arch``, the layer its config names as the
    classifier; otherwise the output width of the last 2-D weight (None if there is none)."""
    if arch and arch.startswith("torchvision:") and dense_models.is_dense(arch.split(":", 1)[1]):
        return dense_models.classes_of(arch.split(":", 1)[1], sd)
    if arch and arch.startswith("timm:"):
        try:
            cfg = _timm().models.get_pretrained_cfg(arch.split(":", 1)[1].split(".", 1)[0])
        except Exception:  # noqa: BLE001 - no config: fall back to the generic rule
            cfg = None
        heads = getattr(cfg, "classifier", None) if cfg is not None else None
        for head in ([heads] if isinstance(heads, str) else list(heads or ())):
            w = sd.get(f"{head}.weight")
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                return int(w.shape[0])
    for k in reversed(list(sd)):
        if k.endswith("weight") and sd[k].dim() == 2:
            return int(sd[k].shape[0])
    return None


def _fits(model: nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == sd.keys() and all(tuple(own[k].shape) == tuple(sd[k].shape) for k in own)


def match_arch(sd: dict[str, torch.Tensor]) -> str:
    """The one architecture whose parameter names and shapes match ``sd`` exactly (classifier width aside)."""
    ncls = _classifier_width(sd)
    candidates = [f"builtin:{n}" for n in zoo.names()] + [f"torchvision:{n}" for n in _torchvision_names()]
    if any(k.startswith(("classifier.low_classifier.", "classifier.4.")) for k in sd):
        candidates += [f"torchvision:{dense_models.SEGMENTATION}{n}" for n in dense_models.segmentation_names()]
    exact: list[str] = []
    scored: list[tuple[float, str]] = []
    for arch in candidates:
        try:
            with torch.device("meta"):
                m, _ = build_arch(arch, _classifier_width(sd, arch) if "segmentation." in arch else ncls, keys=sd)
        except Exception:  # noqa: BLE001 - an arch that cannot take this num_classes is no match
            continue
        if _fits(m, sd):
            exact.append(arch)
        else:
            keys = set(m.state_dict())
            scored.append((len(keys & set(sd)) / max(len(keys | set(sd)), 1), arch))
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise BadInput(f"the state_dict matches several architectures ({', '.join(exact)}); pass {opt('arch')}")
    best = [a for _, a in sorted(scored, reverse=True)[:3]]
    # timm's ~1300 architectures are not searched (building each takes about a minute in all): name it
    raise BadInput(f"no torchvision or builtin architecture matches this state_dict (closest: {', '.join(best)}); "
                   f"pass {opt('arch')} torchvision:NAME, timm:NAME or builtin:NAME")


def _read_checkpoint(path: Path, trust_pickle: bool) -> Any:
    if not path.exists():
        raise BadInput(f"model file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise BadInput(f"{str(path)!r} is a directory; pass a .pt/.pth checkpoint file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                raise BadInput(f"{path.name} is a TorchScript archive, which channel surgery cannot edit; "
                               f"save the eager model's state_dict() and pass it with {opt('arch')}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        pickled = "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text
        if not pickled:
            raise BadInput(f"cannot read {path.name} as a PyTorch checkpoint ({type(exc).__name__}); "
                           "pass a file written by torch.save") from None
        if not trust_pickle:
            raise BadInput(f"{path.name} holds pickled Python objects (a whole model?); loading it would run code "
                           f"from the file: re-run with {opt('trust_pickle')} if you trust it, or save "
                           f"model.state_dict() and pass {opt('arch')}") from None
        return torch.load(path, map_location="cpu", weights_only=False)


def load_model(spec: str, *, weights: str | None = None, arch: str | None = None,
               trust_pickle: bool = False, seed: int = 0) -> LoadedModel:
    """Resolve a MODEL argument (see the module docstring and the README's MODEL section).

    A random initialisation is drawn from ``seed`` (the caller's global RNG state is left as it was), so the
    same seed always builds the same network.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = _load_model(spec, weights=weights, arch=arch, trust_pickle=trust_pickle)
    check_finite(loaded.model, weights or spec)
    return loaded


def check_finite(model: nn.Module, what: str) -> None:
    """Raise BadInput naming the first parameter or buffer of ``model`` that holds a NaN or an infinity.

    Such a model cannot be pruned (its criteria scores are NaN), exported and verified meaningfully: every
    output it computes is NaN, which parity could only report as a disagreement.
    """
    for kind, items in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad = t.detach()
                n_nan, n_inf = int(torch.isnan(bad).sum()), int(torch.isinf(bad).sum())
                parts = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} infinite"] if n_inf else [])
                raise BadInput(f"{what}: {kind} tensor '{name}' holds {' and '.join(parts)} value(s) of "
                               f"{bad.numel()}; the checkpoint is corrupt or its training diverged: pass a "
                               "checkpoint with finite weights")


def _load_model(spec: str, *, weights: str | None, arch: str | None, trust_pickle: bool) -> LoadedModel:
    if spec.startswith(("torchvision:", "builtin:", "timm:")):
        if arch:
            raise BadInput(f"{opt('arch')} is only for checkpoint files; drop it or pass a .pt file as MODEL")
        ncls = None
        sd = None
        if weights:
            obj = _read_checkpoint(Path(weights), trust_pickle=False)
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise BadInput(f"{opt('weights')} {weights} is not a state_dict; save model.state_dict()")
            if spec.startswith("torchvision:"):
                sd = dense_models.adapt_state_dict(spec.split(":", 1)[1], sd)
            ncls = _classifier_width(sd, spec)
        model, shape = build_arch(spec, ncls, keys=sd)
        notes = []
        if sd is not None:
            _load_state_dict(model, sd, f"{opt('weights')} {weights}")
        elif spec.startswith("builtin:"):
            shipped = zoo.shipped_state_dict(zoo.get(spec.split(":", 1)[1]))
            if shipped is not None:
                model.load_state_dict(shipped)
                notes.append(f"{spec}: using the trained weights shipped with deploy-prune")
            else:
                notes.append(f"{spec}: random initialisation (no weights given)")
        else:
            notes.append(f"{spec}: random initialisation (no weights given)")
        return LoadedModel(model.eval(), spec, ncls or _classifier_width(model.state_dict(), spec), shape, notes)
    if weights:
        raise BadInput(f"{opt('weights')} goes with torchvision:NAME, timm:NAME or builtin:NAME; a checkpoint file "
                       "carries its weights")
    path = Path(spec)
    obj = _read_checkpoint(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), None, None, None, [f"{path.name}: trusted pickled module (pickle loading allowed)"])
    if not isinstance(obj, dict):
        raise BadInput(f"{path.name} holds a {type(obj).__name__}, not a model; save model.state_dict()")
    if "state_dict" in obj and "arch" in obj:
        return _load_bundle(obj, path, arch)
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"{path.name} is a dict but not a state_dict (keys: {list(obj)[:4]}); "
                       "save model.state_dict() or {'arch': ..., 'state_dict': ...}")
    notes = []
    if arch is None:
        arch = match_arch(obj)
        notes.append(f"architecture {arch} matched the state_dict's parameter names and shapes")
    ncls = _classifier_width(obj, arch)
    model, shape = build_arch(arch, ncls, keys=obj)
    _load_state_dict(model, obj, path.name)
    return LoadedModel(model.eval(), arch, ncls, shape, notes)


def _load_bundle(obj: dict, path: Path, arch_flag: str | None) -> LoadedModel:
    arch = str(obj["arch"])
    if arch_flag and arch_flag != arch:
        raise BadInput(f"{path.name} records arch {arch}, but {opt('arch')} says {arch_flag}; drop {opt('arch')}")
    ncls = obj.get("num_classes")
    model, shape = build_arch(arch, ncls, keys=obj["state_dict"])
    notes = [f"{path.name}: {arch} checkpoint"]
    plan = None
    if obj.get("plan") or obj.get("prune_plan"):
        from deploy_prune.surgery import analyze, prune_channels

        shape = tuple(obj.get("input_shape") or shape or DEFAULT_INPUT_SHAPE)
        graph = analyze(model, shape)
        try:
            if obj.get("plan"):
                plan = PrunePlan.from_json(obj["plan"])
            else:  # pruned.pt v1: {layer: removed output indices}
                plan = PrunePlan.from_removed(obj["prune_plan"], graph.layer_widths())
            prune_channels(model, graph, plan)
        except (ValueError, KeyError, TypeError, DeployPruneError) as exc:
            raise BadInput(f"{path.name}: its pruning plan does not fit {arch} ({exc}); re-run deploy-prune to rebuild it") \
                from None
        notes.append(f"{path.name}: deploy-prune pruned checkpoint ({len(plan.kept)} layers narrowed)")
    _load_state_dict(model, obj["state_dict"], path.name)
    return LoadedModel(model.eval(), arch, ncls, shape, notes, plan)


def save_pruned(path: Path, model: nn.Module, *, arch: str | None, num_classes: int | None,
                input_shape: tuple[int, ...], plan: PrunePlan) -> None:
    """Write ``pruned.pt``: weights + the pruning plan (kept channels per layer), loadable with
    ``weights_only=True``."""
    torch.save({"format": PRUNED_FORMAT, "arch": arch, "num_classes": num_classes, "input_shape": list(input_shape),
                "plan": plan.to_json(), "state_dict": model.state_dict()}, path)
