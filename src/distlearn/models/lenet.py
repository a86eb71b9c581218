"""A LeNet-style convolutional network for 28x28 images (MNIST, Fashion-MNIST).

LeCun, Bottou, Bengio and Haffner, "Gradient-based learning applied to document recognition" (1998):
two convolution + subsampling stages followed by fully connected layers. Where we differ from LeNet-5: ReLU
instead of scaled tanh, max pooling instead of trainable average subsampling, 'same' padding on the first
convolution (so 28x28 inputs need no padding to 32x32), wider layers (32 and 64 feature maps, a 256-unit
hidden layer: the original 6/16/120/84 tops out near 90% on Fashion-MNIST) and optional dropout before the
classifier. Shapes for a 28x28 input::

    (N, C, 28, 28) -conv5 pad2-> (N, c1, 28, 28) -pool2-> (N, c1, 14, 14) -conv5-> (N, c2, 10, 10)
                   -pool2-> (N, c2, 5, 5) -flatten-> (N, 25*c2) -fc-> (N, hidden) -fc-> (N, classes)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """LeNet-style CNN.

    Args:
        in_channels: 1 for grey images.
        num_classes: output logits.
        channels: feature maps of the two convolutions; ``(6, 16)`` with ``hidden=120`` is LeNet-5's size.
        hidden: units of the fully connected hidden layer.
        dropout: dropout probability before the last layer.
        image_size: input height = width; must leave a positive map after the two stages (>= 12).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 256,
        dropout: float = 0.25,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        side = ((image_size // 2) - 4) // 2  # 'same' conv, pool, 'valid' 5x5 conv, pool
        if side < 1:
            raise ValueError(f"LeNet needs images of at least 12x12, got {image_size}x{image_size}")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
