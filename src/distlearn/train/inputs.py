"""The run's model, loss and data: built-in names, import paths, or a user's Python objects.

    model, loss_fn, train_data, test_data = resolve_inputs(config, model, loss_fn, train_data, test_data)
    data = run_data(config, train_data, test_data)        # RunData: tensors and the batch transform
    check_fit(model, loss_fn, data)                        # one forward and loss on two examples

``config.model`` / ``config.dataset`` / ``config.loss`` name a built-in part or an import path
(``package.module:factory``, :mod:`distlearn.models.factory`); objects passed to :func:`distlearn.train.train`
win over the config. The built-in path (a built-in model on a built-in dataset with cross-entropy) is the
one it always was: nothing here runs a forward pass or draws a random number for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distlearn.data.prepare import RunData, prepare_data
from distlearn.data.user import user_run_data
from distlearn.devices import module_device, to_device
from distlearn.errors import ConfigError
from distlearn.models.factory import build_datasets, build_model, is_import_path, load_loss, load_object
from distlearn.train.config import TrainConfig
from distlearn.train.state import seed_everything

__all__ = ["LossFn", "check_fit", "check_importable", "has_objects", "resolve_inputs", "run_data"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def has_objects(**parts: Any) -> list[str]:
    """The names of the parts given as Python objects (not None)."""
    return [name for name, value in parts.items() if value is not None]


def check_importable(config: TrainConfig) -> None:
    """ConfigError now for an import path of the config that does not import or names nothing."""
    for what, value in (("--model", config.model), ("--dataset", config.dataset), ("--loss", config.loss)):
        if is_import_path(value):
            load_object(value, what)


def resolve_inputs(
    config: TrainConfig, model: nn.Module | None, loss_fn: LossFn | None, train_data: Any, test_data: Any
) -> tuple[nn.Module | None, LossFn | None, Any, Any]:
    """The objects the run uses: those given, else those the config's import paths build.

    A model built from an import path is built after ``seed_everything(config.seed)``, so every replica
    (and every rerun) starts from the same weights. None stands for the built-in part.
    """
    if (train_data is None) != (test_data is None):
        raise ConfigError("pass both train_data and test_data, or neither (to load config.dataset)")
    if loss_fn is None and is_import_path(config.loss):
        loss_fn = load_loss(config.loss)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn is a {type(loss_fn).__name__}; pass a callable(outputs, targets)")
    if model is None and is_import_path(config.model):
        seed_everything(config.seed)
        model = build_model(config.model)
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}; pass a torch.nn.Module")
    if train_data is None and is_import_path(config.dataset):
        train_data, test_data = build_datasets(config.dataset)
    return model, loss_fn, train_data, test_data


def run_data(config: TrainConfig, train_data: Any, test_data: Any) -> RunData:
    """The run's :class:`RunData`: the built-in dataset as always, or the user's sets adapted."""
    subset = {"train_samples": config.train_samples, "test_samples": config.test_samples}
    if train_data is None:
        return prepare_data(
            config.dataset, data_root=config.data_root, seed=config.seed, augment=config.augment, **subset
        )
    name = config.dataset if is_import_path(config.dataset) else "user data"
    return user_run_data(train_data, test_data, name=name, seed=config.seed, augment=config.augment, **subset)


def check_fit(config: TrainConfig, model: nn.Module | None, loss_fn: LossFn | None, data: RunData) -> None:
    """ConfigError if the data does not fit the model or the loss: one forward pass on two examples.

    The model runs in eval mode without gradients (its buffers, e.g. BatchNorm statistics, stay as they
    are). A built-in model needs image data; the built-in loss (cross-entropy) needs class labels.
    """
    if model is None:
        if not data.is_images:
            raise ConfigError(
                f"--model {config.model} takes images (N, C, H, W); this data's inputs are "
                f"{tuple(data.train_images.shape[1:])} per example: pass your own model "
                "(model=, or --model package.module:factory)"
            )
        return
    if loss_fn is None and not data.classification:
        raise ConfigError(
            f"the targets are {data.train_labels.dtype} {tuple(data.train_labels.shape[1:])} per example, "
            "not class labels, so cross-entropy does not apply: pass loss_fn= "
            "(or --loss package.module:name),"
            " e.g. torch.nn.functional:mse_loss"
        )
    if len(data.train_labels) == 0:
        raise ConfigError("the training set is empty")
    x, y = data.transform(data.train_images[:2]), data.train_labels[:2]
    x, y = to_device((x, y), module_device(model) or torch.device("cpu"))  # a user's model on its GPU
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(x)
            value = (loss_fn or nn.functional.cross_entropy)(outputs, y)
    except Exception as error:
        raise ConfigError(
            f"the data does not fit the model: inputs {tuple(x.shape[1:])} and targets {tuple(y.shape[1:])} "
            f"per example raised {type(error).__name__}: {error}; make the dataset's shapes match the model"
        ) from error
    finally:
        model.train(was_training)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"the loss returned {shape}, not a scalar tensor; reduce it (e.g. .mean())")
    if data.classification and outputs.ndim != 2:
        data.classification = False  # labels, but not one score per class: no arg-max accuracy
    if loss_fn is None and (outputs.ndim != 2 or outputs.shape[1] <= int(data.train_labels.max())):
        raise ConfigError(
            f"the targets are class labels up to {int(data.train_labels.max())} but the model's outputs are "
            f"{tuple(outputs.shape[1:])} per example; it needs one output per class"
        )
