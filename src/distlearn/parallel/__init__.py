"""Strategies: how replicas combine their work. One file per strategy; the contract is in ``base.py``.

``create_strategy(name, options, run=..., **fields)`` builds one by name; :data:`STRATEGIES` maps each name
to ``"module:Class"`` so a strategy's module is only imported when it is used. Adding a strategy is one
file with its class and its options dataclass, and one line here (or, for a user's own strategy outside
distlearn, ``register_strategy`` or an import path ``--strategy package.module:Class``).
"""

from __future__ import annotations

import importlib
from typing import Any

from distlearn.errors import ConfigError
from distlearn.parallel.base import Strategy, StrategyOptions, StrategyStats, epoch_batches, make_options
from distlearn.parallel.single import SingleProcess

__all__ = [
    "STRATEGIES",
    "SingleProcess",
    "Strategy",
    "StrategyOptions",
    "StrategyStats",
    "create_strategy",
    "epoch_batches",
    "make_options",
    "register_strategy",
    "strategy_class",
]

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


def register_strategy(name: str, target: str) -> None:
    """Make ``name`` build the strategy class at ``target`` (``"package.module:Class"``)."""
    if ":" not in target:
        raise ConfigError(f"strategy target {target!r} must be 'package.module:Class'")
    STRATEGIES[name] = target


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy ``name``: a key of :data:`STRATEGIES` or an import path ``module:Class``."""
    target = STRATEGIES.get(name, name if ":" in name else None)
    if target is None:
        raise ConfigError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)} "
            "(or give your own as package.module:Class)"
        )
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"strategy {name!r}: cannot import {target} ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy {name!r}: {target} is not a distlearn.parallel.Strategy subclass")
    return cls


def create_strategy(name: str, options: Any = None, /, *, run: Any = None, **fields: Any) -> Strategy:
    """Strategy ``name`` with ``options`` (its options dataclass) or keyword ``fields`` of it.

    ``run`` is the run's common options (a :class:`distlearn.train.TrainConfig`), which some strategies read
    (the parameter server's optimizer, DNI's data and model); ``run.options`` are used when ``options`` is
    None.
    """
    return strategy_class(name)(options, run=run, **fields)
