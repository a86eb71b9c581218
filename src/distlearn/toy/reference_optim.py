"""A stand-in optimizer registry on ``torch.optim``, used only while ``distlearn.optim`` is absent.

The toy benchmark is meant to run distlearn's own optimizers (``distlearn.optim.OPTIMIZERS``,
``create``, ``needs_closure``). So that ``distlearn toy`` works in a checkout without that package, the
same three names are provided here for the methods ``torch.optim`` has, with the hyper-parameters the
overview uses (momentum 0.9). The conjugate-gradient methods have no torch counterpart and are absent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from distlearn.errors import ConfigError

__all__ = ["OPTIMIZERS", "create", "needs_closure"]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, **h: torch.optim.SGD(params, **h),
    "momentum": lambda params, **h: torch.optim.SGD(params, **{"momentum": 0.9, **h}),
    "nesterov": lambda params, **h: torch.optim.SGD(params, **{"momentum": 0.9, "nesterov": True, **h}),
    "adagrad": lambda params, **h: torch.optim.Adagrad(params, **h),
    "rmsprop": lambda params, **h: torch.optim.RMSprop(params, **h),
    "adadelta": lambda params, **h: torch.optim.Adadelta(params, **h),
    "adam": lambda params, **h: torch.optim.Adam(params, **h),
}


def create(name: str, params: Iterable[torch.Tensor], **hparams: Any) -> torch.optim.Optimizer:
    """``torch.optim``'s version of optimizer ``name``; an unknown name raises ConfigError."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; known optimizers are: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **hparams)


def needs_closure(name: str) -> bool:
    """None of these re-evaluate the loss within a step."""
    return False
