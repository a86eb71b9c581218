"""Strategies: how replicas combine their work. One file per strategy; the contract is in ``base.py``.

``create_strategy(name, **options)`` builds one by name; :data:`STRATEGIES` maps each name to
``"module:Class"`` so a strategy's module is only imported when it is used. A later strategy registers
itself by adding one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from distlearn.errors import ConfigError
from distlearn.parallel.base import Strategy, StrategyStats, epoch_batches
from distlearn.parallel.single import SingleProcess

__all__ = ["STRATEGIES", "SingleProcess", "Strategy", "StrategyStats", "create_strategy", "epoch_batches"]

STRATEGIES: dict[str, str] = {
    "single": "distlearn.parallel.single:SingleProcess",
    "sync": "distlearn.parallel.sync:SyncDataParallel",
    "ddp": "distlearn.parallel.ddp:TorchDDP",
    "ps": "distlearn.parallel.ps:ParameterServer",
    "hogwild": "distlearn.parallel.hogwild:Hogwild",
    "local-sgd": "distlearn.parallel.local_sgd:LocalSGD",
    "easgd": "distlearn.parallel.easgd:ElasticAveraging",
    "dni": "distlearn.parallel.dni:DecoupledStages",
}


def create_strategy(name: str, config: Any = None, **options: Any) -> Strategy:
    """Instantiate strategy ``name`` (a key of :data:`STRATEGIES`) with keyword ``options``.

    With ``config`` (a :class:`distlearn.train.TrainConfig`) and no options, the strategy reads its own
    settings from it (``Strategy.from_config``).
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    module_name, _, class_name = STRATEGIES[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if config is not None and not options:
        return cls.from_config(config)
    return cls(**options)
