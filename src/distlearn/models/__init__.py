"""The networks the benchmarks train: an MLP, a LeNet-style CNN for 28x28 inputs, small CIFAR ResNets.

``create_model(name, in_channels=..., num_classes=..., image_size=...)`` builds one by name; ``MODELS``
lists the names. Input scaling, normalisation and augmentation live in :mod:`distlearn.models.transforms`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distlearn.errors import ConfigError
from distlearn.models.lenet import LeNet
from distlearn.models.mlp import MLP
from distlearn.models.resnet import ResNet
from distlearn.models.transforms import BatchTransform

__all__ = ["MLP", "MODELS", "BatchTransform", "LeNet", "ResNet", "count_parameters", "create_model"]


def _mlp(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return MLP(in_channels * image_size * image_size, num_classes, hidden=(256, 128))


def _lenet(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return LeNet(in_channels, num_classes, image_size=image_size)


def _resnet(depth: int) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        return ResNet(depth, in_channels, num_classes)

    return build


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "mlp": _mlp,
    "lenet": _lenet,
    "resnet8": _resnet(8),
    "resnet14": _resnet(14),
    "resnet20": _resnet(20),
}
"""name -> builder(in_channels, num_classes, image_size)."""


def create_model(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for ``in_channels x image_size x image_size`` inputs."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](in_channels, num_classes, image_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
