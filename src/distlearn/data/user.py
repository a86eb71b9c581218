"""A user's data for the trainer: a torch ``Dataset``, a pair of tensors ``(x, y)`` or an ``ArrayDataset``.

    data = user_run_data(train, test, train_samples=None, test_samples=None, seed=0)
    x = data.transform(data.train_images[indices])        # the batch as the model sees it

Images stay as the built-in datasets have them: an :class:`~distlearn.data.ArrayDataset`, or a pair whose
``x`` is uint8 ``(N, C, H, W)`` with integer labels, is scaled to [0, 1] and normalised on the fly with the
training set's per-channel statistics (:func:`distlearn.data.prepare.prepare_data`). Any other data goes
to the model unchanged: float features ``(N, F)``, sequences ``(N, T, F)``, token ids, ... A torch
``Dataset`` is read once, item by item, into two tensors (``default_collate`` of its ``(x, y)`` items): the
trainer indexes whole batches by position, so the data must fit in memory.

Targets that are integer class labels of shape ``(N,)`` make a classification run (accuracy is the arg-max
of the outputs); any other targets (float regression values, sequences) make a run whose records and
summary have no accuracy (None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from distlearn.data import ArrayDataset
from distlearn.data.prepare import RunData, prepare_data, subset_train
from distlearn.errors import ConfigError
from distlearn.models.transforms import channel_stats

__all__ = [
    "PassThrough",
    "TrainData",
    "UserDataset",
    "is_classification",
    "is_image_data",
    "to_tensors",
    "user_run_data",
]


TrainData = Any
"""What ``train_data=``/``test_data=`` take: a torch Dataset of (x, y), a pair of tensors, an ArrayDataset."""


@dataclass
class UserDataset:
    """What the trainer records about a user's dataset (the built-in ones are ArrayDatasets)."""

    name: str = "user data"
    source: str | None = None
    note: str | None = None
    classes: list[str] = field(default_factory=list)


class PassThrough:
    """The batch transform of non-image data: the batch as it is (the generator is not used)."""

    augments = False

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return batch

    def __repr__(self) -> str:
        return "PassThrough()"


def is_image_data(data: Any) -> bool:
    """An ArrayDataset-like object (``images``, ``labels``, ``classes``, ``mean``, ``std``)."""
    return all(hasattr(data, name) for name in ("images", "labels", "classes", "mean", "std"))


def is_classification(targets: torch.Tensor) -> bool:
    """Integer class labels, one per example: accuracy means something."""
    return targets.ndim == 1 and not targets.dtype.is_floating_point and targets.dtype != torch.bool


def to_tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a pair of tensors or of a map-style torch Dataset of ``(x, y)`` items."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if len(data) == 0:
            raise ConfigError(f"{what} is empty; give it at least one batch of examples")
        first = data[0]
        if not (isinstance(first, tuple | list) and len(first) == 2):
            raise ConfigError(
                f"{what}: item 0 is a {type(first).__name__}; the trainer needs (input, target) pairs"
            )
        x, y = default_collate([data[i] for i in range(len(data))])
    else:
        raise ConfigError(
            f"{what} is a {type(data).__name__}; pass a torch Dataset of (x, y) items, a pair of tensors "
            "(x, y) or a distlearn.data.ArrayDataset"
        )
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ConfigError(
            f"{what}: inputs and targets must be tensors, got {type(x).__name__}, {type(y).__name__}"
        )
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ConfigError(
            f"{what}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} need one target per example "
            "(the first dimension)"
        )
    return x, y


def _as_images(x: torch.Tensor, y: torch.Tensor, name: str, train_x: torch.Tensor) -> ArrayDataset | None:
    """uint8 ``(N, C, H, W)`` images with class labels as an ArrayDataset (statistics of ``train_x``)."""
    if x.dtype != torch.uint8 or x.ndim != 4 or not is_classification(y):
        return None
    mean, std = channel_stats(train_x)
    classes = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
    return ArrayDataset(name, "", x, y.long(), classes, mean, std, source="user tensors")


def user_run_data(
    train: Any,
    test: Any,
    *,
    name: str = "user data",
    train_samples: int | None = None,
    test_samples: int | None = None,
    seed: int = 0,
    augment: bool | None = None,
) -> RunData:
    """The run's data from a user's train and test sets, subset as the built-in ones are."""
    if is_image_data(train) and is_image_data(test):
        return prepare_data(
            name, train_samples=train_samples, test_samples=test_samples, seed=seed, augment=augment,
            train_data=train, test_data=test,
        )  # fmt: skip
    train_x, train_y = to_tensors(train, "the training set")
    test_x, test_y = to_tensors(test, "the test set")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ConfigError(
            f"training inputs are {tuple(train_x.shape[1:])} per example but test inputs "
            f"{tuple(test_x.shape[1:])}; give both sets the same shape"
        )
    images = _as_images(train_x, train_y, name, train_x), _as_images(test_x, test_y, name, train_x)
    if images[0] is not None and images[1] is not None:
        classes = max(len(images[0].classes), len(images[1].classes))
        for image_set in images:
            image_set.classes = [str(c) for c in range(classes)]
        return user_run_data(*images, name=name, train_samples=train_samples, test_samples=test_samples,
                             seed=seed, augment=augment)  # fmt: skip
    if augment:
        raise ConfigError("--augment crops and flips images; this data is not uint8 (N, C, H, W) images")
    train_x, train_y = subset_train(train_x, train_y, train_samples, seed)
    if test_samples is not None:
        test_x, test_y = test_x[:test_samples], test_y[:test_samples]
    classification = is_classification(train_y) and is_classification(test_y)
    classes = []
    if classification and len(train_y):
        classes = [str(c) for c in range(int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1)]
    info = UserDataset(name=name, classes=classes)
    return RunData(info, train_x, train_y, test_x, test_y, PassThrough(), False, classification)  # type: ignore[arg-type]
