"""Shared by the sync test and its workers: the data, the run config and the bucketing cases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distlearn.train import TrainConfig

# (label, bucket size in MiB, overlap): one bucket per tensor without overlap, small buckets with overlap
# (several buckets, launched from the hooks), and DDP's default 25 MiB (one bucket) with overlap.
CASES = [("per-tensor", 0.0, False), ("buckets-overlap", 0.02, True), ("one-bucket-overlap", 25.0, True)]
GLOBAL_BATCH = 24  # divisible by R = 1, 2, 3, 4
STEPS = 12


@dataclass
class Images:
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]


def synthetic_data() -> tuple[Images, Images]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (480, 1, 10, 10), generator=generator, dtype=torch.uint8)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127.5).long() + 2 * (images[:, 0, 0, 0] > 127).long()
    train = Images(images[:384], labels[:384], ["a", "b", "c", "d"], [0.5], [0.29])
    test = Images(images[384:], labels[384:], ["a", "b", "c", "d"], [0.5], [0.29])
    return train, test


def config_for(out: Path) -> TrainConfig:
    return TrainConfig.build(
        dataset="mnist",
        model="mlp",
        optimizer="momentum",
        lr=0.05,
        batch_size=GLOBAL_BATCH,
        steps=STEPS,
        augment=False,
        out=str(out),
        checkpoints=False,
        progress="off",
        tensorboard="off",
        quiet=True,
        log_every=4,
        threads=1,
    )
