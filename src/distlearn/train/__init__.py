"""The trainer: one loop for every strategy, and the run's config.

    from distlearn.train import TrainConfig, train
    result = train(TrainConfig(dataset="fashion-mnist", model="lenet", optimizer="adam", epochs=2))

    import distlearn
    result = distlearn.train(distlearn.TrainConfig(strategy="sync", workers=2))   # the package is callable

Modules: :mod:`~distlearn.train.config` (the common options composed with the strategy's),
:mod:`~distlearn.train.loop` (the loop), :mod:`~distlearn.train.state` (the run's position, RNG states,
what a checkpoint resumes), :mod:`~distlearn.train.schedule` (the learning-rate schedule),
:mod:`~distlearn.train.report` (progress and summary). Evaluation is :func:`distlearn.evaluation.evaluate`
and the data :func:`distlearn.data.prepare.prepare_data`, shared with the DNI pipeline.
"""

import sys
import types
from typing import Any

from distlearn.config import parse_options
from distlearn.data.user import TrainData as ImageDataset
from distlearn.evaluation import evaluate
from distlearn.optim import create as create_optimizer
from distlearn.optim import needs_closure, optimizer_names
from distlearn.train.config import TrainConfig, config_from_dict, load_config_file, validate_config
from distlearn.train.loop import TrainResult, train
from distlearn.train.schedule import LRSchedule

__all__ = [
    "ImageDataset",
    "LRSchedule",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "create_optimizer",
    "evaluate",
    "load_config_file",
    "needs_closure",
    "optimizer_names",
    "parse_options",
    "train",
    "validate_config",
]


class _CallableModule(types.ModuleType):
    """``distlearn.train(config)`` calls :func:`distlearn.train.loop.train`: the package is also the function
    (``from distlearn.train import train`` gives the function itself)."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
