"""torchvision's dense-prediction models as MODEL specs: segmentation nets, and detectors' backbones.

* ``torchvision:segmentation.NAME``: every model in ``torchvision.models.segmentation`` (FCN, DeepLabV3, LRASPP),
  random init unless weights are given. Their forward returns a dict (``{"out"}``, plus ``"aux"`` with the
  auxiliary head). The auxiliary head is built only when the given state_dict has it (``aux_classifier.*``);
  torchvision builds it for training, and at inference it is dead weight.
* ``torchvision:detection.NAME.backbone``: the backbone of a torchvision detector as a module of its own: for
  Faster R-CNN, Mask R-CNN, Keypoint R-CNN, RetinaNet and FCOS the ResNet/MobileNet body *with* its feature
  pyramid (FPN; returns ``{"0", "1", ..., "pool"}``), for SSD/SSDlite the VGG/MobileNet feature extractor.
  Every output of the backbone reaches the graph's output, so the surgery keeps their widths: the FPN's
  ``out_channels`` (256) and SSD's feature widths stay what the detection heads read, and the pruned backbone
  fits back into the unchanged detector (:func:`detector_with_backbone`).
* ``torchvision:detection.NAME`` (the whole detector) is refused with the reason: its forward returns a list of
  per-image dicts with a data-dependent number of boxes, which torch.fx cannot trace for the surgery.

No weights are ever downloaded: ``weights=None`` and ``weights_backbone=None`` always.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput

__all__ = ["SEGMENTATION", "DETECTION", "is_dense", "names", "build", "classes_of", "adapt_state_dict",
           "detector_with_backbone", "segmentation_names", "detection_names"]

SEGMENTATION = "segmentation."
DETECTION = "detection."
BACKBONE = ".backbone"


def segmentation_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def detection_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def names() -> list[str]:
    """Every spec this module builds, without the ``torchvision:`` prefix."""
    return [SEGMENTATION + n for n in segmentation_names()] + [DETECTION + n + BACKBONE for n in detection_names()]


def is_dense(name: str) -> bool:
    """Whether ``name`` (after ``torchvision:``) is a segmentation or detection spec."""
    return name.startswith((SEGMENTATION, DETECTION))


def _unknown(name: str, known: list[str], what: str) -> BadInput:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return BadInput(f"unknown torchvision {what} {name!r}{hint}; choose one of {', '.join(known)}")


def has_aux(keys: Iterable[str] | None) -> bool:
    """Whether a segmentation state_dict carries the auxiliary head."""
    return any(k.startswith("aux_classifier.") for k in (keys or ()))


def classes_of(name: str, sd: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes a segmentation state_dict predicts (its last classifier conv's width)."""
    if not name.startswith(SEGMENTATION):
        return None
    for key in ("classifier.4.weight", "classifier.low_classifier.weight"):  # FCN/DeepLabV3, LRASPP
        w = sd.get(key)
        if isinstance(w, torch.Tensor) and w.dim() == 4:
            return int(w.shape[0])
    return None


def adapt_state_dict(name: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone spec accepts a whole detector's state_dict too: its ``backbone.*`` entries are taken."""
    out = dict(sd)
    if name.startswith(DETECTION) and name.endswith(BACKBONE):
        if any(k.startswith("backbone.") for k in sd):
            out = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        # torchvision builds a detector with pretrained weights on FrozenBatchNorm2d, which has no
        # num_batches_tracked; the backbone here uses BatchNorm2d (the same function in eval mode)
        for k in [k for k in out if k.endswith(".running_mean")]:
            out.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    return out


def build(name: str, num_classes: int | None = None, keys: Iterable[str] | None = None) -> nn.Module:
    """Build ``segmentation.NAME`` or ``detection.NAME.backbone`` with random init (eval mode).

    Args:
        name: the spec after ``torchvision:``.
        num_classes: a segmentation model's class count (torchvision's default, 21, when None).
        keys: the state_dict keys that will be loaded, if any: the auxiliary head is built when they have it.
    """
    import torchvision

    if name.startswith(SEGMENTATION):
        arch = name[len(SEGMENTATION):]
        known = segmentation_names()
        if arch not in known:
            raise _unknown(arch, known, "segmentation model")
        kw: dict[str, Any] = {"weights": None, "weights_backbone": None, "aux_loss": has_aux(keys)}
        if num_classes is not None:
            kw["num_classes"] = num_classes
        return torchvision.models.get_model(arch, **kw).eval()
    arch = name[len(DETECTION):]
    known = detection_names()
    if not arch.endswith(BACKBONE):
        if arch not in known:
            raise _unknown(arch, known, "detection model")
        raise BadInput(f"torchvision:{name} is a whole detector: its forward returns a list of per-image dicts "
                       "with a data-dependent number of boxes (NMS), which channel surgery cannot trace; prune "
                       f"its backbone + FPN with torchvision:{name}{BACKBONE} and load it back into the detector "
                       "(deploy_prune.dense_models.detector_with_backbone)")
    arch = arch[: -len(BACKBONE)]
    if arch not in known:
        raise _unknown(arch, known, "detection model")
    return _detector(arch).backbone.eval()


def _detector(arch: str, **kw: Any) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kw).eval()


def detector_with_backbone(name: str, backbone: nn.Module, **detector_kwargs: Any) -> nn.Module:
    """The torchvision detector ``name`` (``fasterrcnn_resnet50_fpn`` or ``detection.NAME.backbone``) with
    ``backbone`` (e.g. a pruned one, from ``load_model("pruned.pt").model``) in place of its own.

    The heads are untouched: the pruned backbone's outputs keep their widths (FPN ``out_channels``), so they fit.
    Load the rest of the detector's trained weights afterwards (``load_state_dict(sd, strict=False)`` with the
    ``backbone.*`` entries left out), then finetune the whole detector with your own recipe.
    """
    arch = name[len(DETECTION):] if name.startswith(DETECTION) else name
    arch = arch[: -len(BACKBONE)] if arch.endswith(BACKBONE) else arch
    det = _detector(arch, **detector_kwargs)
    want, got = getattr(det.backbone, "out_channels", None), getattr(backbone, "out_channels", None)
    if want is not None and got != want:
        raise BadInput(f"the backbone's out_channels is {got}, but {arch}'s heads read {want}: pass the backbone "
                       f"of {arch} (torchvision:{DETECTION}{arch}{BACKBONE}), pruned by deploy-prune")
    det.backbone = backbone
    return det
