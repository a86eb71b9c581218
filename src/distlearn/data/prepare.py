"""The run's data, prepared one way for every strategy: load, subset, transform.

    data = prepare_data("fashion-mnist", train_samples=12_000, test_samples=2_000, seed=0)
    x = data.transform(data.train_images[indices], generator)   # a scaled, normalised float batch

Used by the trainer loop and by the model-parallel (DNI) pipeline, so both see the same examples:

* ``train_samples``: a seeded random subset of the training set (the same on every rank and every run
  with that seed), kept in its original order;
* ``test_samples``: the first ``N`` test examples;
* the transform scales uint8 images to [0, 1] and normalises them with the training set's statistics;
  with ``augment`` it adds the random crop (padding ``max(1, H // 8)``) and horizontal flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distlearn.data import load_dataset
from distlearn.errors import ConfigError
from distlearn.models.transforms import BatchTransform

__all__ = ["RunData", "prepare_data", "subset_train"]


@dataclass
class RunData:
    """Tensors and the batch transform of one run (images stay uint8 in memory)."""

    train: Any
    """The training dataset as loaded (its ``name``, ``source``, ``note``, ``classes``, ``mean``, ``std``)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    transform: BatchTransform
    augment: bool
    classification: bool = True
    """Targets are class labels (accuracy means something); False for regression or sequence targets."""

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def is_images(self) -> bool:
        """Normalised images ``(N, C, H, W)`` (what the built-in models take)."""
        return isinstance(self.transform, BatchTransform) and self.train_images.ndim == 4

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one training image."""
        _, channels, height, width = self.train_images.shape
        return channels, height, width


def subset_train(
    images: torch.Tensor, labels: torch.Tensor, samples: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``samples`` examples, in their original order (all of them if None)."""
    if samples is None or samples >= len(labels):
        return images, labels
    subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    subset = subset[:samples].sort().values
    return images[subset], labels[subset]


def _check_dataset(data: Any, what: str) -> None:
    for attribute in ("images", "labels", "classes", "mean", "std"):
        if not hasattr(data, attribute):
            raise ConfigError(f"{what} has no {attribute!r}; pass a distlearn.data.ArrayDataset")
    images, labels = data.images, data.labels
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"{what}: images must be (N, C, H, W) with one label each, got {tuple(images.shape)} and "
            f"{tuple(labels.shape)} labels"
        )


def prepare_data(
    dataset: str,
    *,
    data_root: str | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    seed: int = 0,
    augment: bool | None = None,
    train_data: Any = None,
    test_data: Any = None,
) -> RunData:
    """Load ``dataset`` (or take ``train_data``/``test_data``), subset it and build its transform.

    ``augment=None`` means on for cifar10 only.
    """
    if (train_data is None) != (test_data is None):
        raise ConfigError("pass both train_data and test_data, or neither (to load config.dataset)")
    if train_data is None:
        train_data = load_dataset(dataset, "train", root=data_root)
        test_data = load_dataset(dataset, "test", root=data_root)
    _check_dataset(train_data, "training set")
    _check_dataset(test_data, "test set")
    train_images, train_labels = subset_train(train_data.images, train_data.labels, train_samples, seed)
    test_images, test_labels = test_data.images, test_data.labels
    if test_samples is not None:
        test_images, test_labels = test_images[:test_samples], test_labels[:test_samples]
    augment = augment if augment is not None else dataset == "cifar10"
    height = train_images.shape[2]
    transform = BatchTransform(
        train_data.mean, train_data.std, crop_padding=max(1, height // 8) if augment else 0, flip=augment
    )
    return RunData(train_data, train_images, train_labels, test_images, test_labels, transform, augment)
