"""Small synthetic image classification data for the trainer tests (seconds, not minutes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch


@dataclass
class SyntheticImages:
    """The fields of distlearn.data.ArrayDataset the trainer reads: uint8 images, labels, classes, stats."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    name: str = "synthetic"
    source: str = "generated in tests/train/conftest.py"
    note: str | None = None
    extra: dict = field(default_factory=dict)


def make_synthetic(
    n: int, *, seed: int, classes: int = 4, channels: int = 1, side: int = 12
) -> SyntheticImages:
    """Each class is a fixed random prototype image; examples are the prototype plus uniform noise."""
    prototypes = torch.randint(
        0, 256, (classes, channels, side, side), generator=torch.Generator().manual_seed(123)
    )
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    noise = torch.randint(-90, 91, (n, channels, side, side), generator=generator)
    images = (prototypes[labels].long() + noise).clamp(0, 255).to(torch.uint8)
    scaled = images.float() / 255
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3)).tolist()
    return SyntheticImages(images, labels, [f"class{i}" for i in range(classes)], mean, std)


@pytest.fixture(scope="session")
def synthetic() -> tuple[SyntheticImages, SyntheticImages]:
    """(train, test): 384 and 128 grey 12x12 images of 4 classes."""
    return make_synthetic(384, seed=1), make_synthetic(128, seed=2)
