"""A multi-layer perceptron for flattened images: the baseline network of the overview's MNIST experiments.

``x (N, C, H, W) -> flatten (N, C*H*W) -> [Linear -> ReLU -> (Dropout)] * len(hidden) -> Linear -> logits``.
Weights use torch's default initialisation (Kaiming-uniform with a = sqrt(5)), so a fixed seed gives fixed
weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected classifier.

    Args:
        in_features: inputs per example after flattening (784 for 28x28 grey images).
        num_classes: output logits.
        hidden: width of each hidden layer; ``()`` gives multinomial logistic regression.
        dropout: dropout probability after each hidden activation (0 disables it).

    Tuning: two hidden layers of a few hundred units reach about 97-98% on MNIST-sized problems; wider
    layers mostly cost time. Dropout 0.1-0.3 helps when the training split is small.
    """

    def __init__(
        self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(
                f"MLP needs in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
