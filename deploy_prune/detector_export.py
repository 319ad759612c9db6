"""Exporting a whole torchvision detector (e.g. with a pruned backbone put back) to ONNX, or saying why not.

deploy-prune prunes a detector's backbone + FPN as a module of its own (``torchvision:detection.NAME.backbone``,
see :mod:`deploy_prune.dense_models`). The detector around it (anchor generation, RPN, RoI heads, NMS) returns a
data-dependent number of boxes per image. :func:`export_detector` tries deploy-prune's exporter (torch.onnx's
dynamo exporter, :func:`deploy_prune.export.export_onnx`) on the whole detector for one image and, where it
cannot export it, raises a :class:`~deploy_prune.errors.BadInput` that gives the exporter's reason. With torch
2.14 it cannot for the detectors tried (Faster R-CNN MobileNetV3-320-FPN: ``GuardOnDataDependentSymNode`` on
the number of proposals; SSDlite likewise); docs/dense-prediction.md records what was tried.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from deploy_prune.errors import BadInput, DeployPruneError

__all__ = ["SingleImage", "export_detector"]


class SingleImage(nn.Module):
    """A torchvision detector as a tensor-in, tensors-out module: one image ``(1, 3, H, W)`` in, the detector's
    ``boxes``, ``scores`` and ``labels`` for it out (a dict, so the ONNX outputs carry those names)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        det = self.detector([x[0]])[0]
        return {"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"]}


def export_detector(detector: nn.Module, path: Path, image_shape: tuple[int, ...] = (1, 3, 320, 320)) -> None:
    """Export ``detector`` (a torchvision detector in eval mode) for one image of ``image_shape`` to ``path``.

    Raises:
        BadInput: torch.onnx's dynamo exporter cannot export it; the message gives the exporter's one-line reason.
    """
    from deploy_prune.export import check_onnx, export_onnx

    model = SingleImage(detector.eval())
    example = torch.rand(*image_shape, generator=torch.Generator().manual_seed(0))
    try:
        export_onnx(model, Path(path), example)
        check_onnx(Path(path))
    except DeployPruneError as exc:
        raise BadInput(f"the whole {type(detector).__name__} cannot be exported by torch.onnx's dynamo exporter "
                       f"({exc}); its box count depends on the data (NMS). Deploy the pruned backbone "
                       "(model.onnx of the backbone run) and run the heads in PyTorch, or try torch.onnx.export("
                       "..., dynamo=False), the legacy TorchScript exporter, outside deploy-prune's parity "
                       "gate") from None
