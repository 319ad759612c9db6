"""The embedded model zoo (``builtin:NAME``): small networks that run on a laptop CPU in seconds.

Installed as ``deploy_prune.models``. Builders are registered by name; a duplicate name is an error.
``mnist_cnn`` ships trained weights (``mnist_cnn.pt``, regenerate with ``python -m deploy_prune.models.train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    checkpoint: str | None = None  # file shipped beside this module


_REGISTRY: dict[str, BuiltinModel] = {}


def register(name: str, input_shape: tuple[int, ...], num_classes: int, description: str,
             checkpoint: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"an entry is already registered under the name {name!r}")
        _REGISTRY[name] = BuiltinModel(name, fn, input_shape, num_classes, description, checkpoint)
        return fn

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> BuiltinModel:
    return _REGISTRY[name]


def shipped_state_dict(entry: BuiltinModel) -> dict[str, torch.Tensor] | None:
    """The trained weights shipped for ``entry`` (loaded with weights_only=True), or None."""
    if entry.checkpoint is None:
        return None
    ref = resources.files(__name__).joinpath(entry.checkpoint)
    if not ref.is_file():
        return None
    with resources.as_file(ref) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register("mnist_cnn", (1, 1, 28, 28), 10,
          "5-conv BN CNN (32-32-pool-64-64-pool-128, GAP, FC) for 28x28 digits; ships trained on mnist5k",
          checkpoint="mnist_cnn.pt")
def mnist_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        *_cbr(1, 32), *_cbr(32, 32), nn.MaxPool2d(2),
        *_cbr(32, 64), *_cbr(64, 64), nn.MaxPool2d(2),
        *_cbr(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class MnistResNet(nn.Module):
    """A small ResNet (stem 16, stages 16/32/64, two blocks each) for 28x28 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(in_channels, 16))
        layers: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register("mnist_resnet", (1, 1, 28, 28), 10, "ResNet-14-style network (16/32/64 channels) for 28x28 digits")
def mnist_resnet(num_classes: int = 10) -> nn.Module:
    return MnistResNet(num_classes)


@register("lenet300", (1, 1, 28, 28), 10, "LeNet-300-100 (FC 784-300-100-10), the lottery-ticket paper's MNIST net")
def lenet300(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(inplace=True), nn.Linear(300, 100),
                         nn.ReLU(inplace=True), nn.Linear(100, num_classes))


@register("lenet5", (1, 1, 28, 28), 10,
          "LeNet-5 as in Hu et al.'s APoZ Table 2 (conv 20-50 5x5 with 2x2 max-pools, FC 500-10), ReLU after every "
          "hidden layer")
def lenet5(num_classes: int = 10) -> nn.Module:
    # Caffe's LeNet has a ReLU only after ip1; APoZ counts post-ReLU zeros and Hu et al. trim CONV2 together
    # with FC1, so a ReLU follows each conv here as well.
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(800, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes))
