"""The overview's optimizers as ``torch.optim.Optimizer`` subclasses, and a registry by name.

    from distlearn import optim
    opt = optim.create("nesterov", model.parameters(), lr=0.01, momentum=0.9)
    optim.needs_closure("cg-hs")          # True: CG's line search re-evaluates the loss
    optim.torch_equivalent("adam", lr=1e-3, eps_hat=False)   # the torch.optim class and arguments

Names: ``sgd``, ``momentum``, ``nesterov``, ``adagrad``, ``rmsprop``, ``adadelta``, ``adam``, ``cg-fr``
and ``cg-hs``. See docs/optimizers.md for the formulas, papers and measured results.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from distlearn.errors import ConfigError
from distlearn.optim.base import FirstOrderOptimizer
from distlearn.optim.cg import ConjugateGradient, FletcherReeves, HestenesStiefel
from distlearn.optim.first_order import SGD, Adadelta, Adagrad, Adam, Momentum, Nesterov, RMSProp

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "ConjugateGradient",
    "FirstOrderOptimizer",
    "FletcherReeves",
    "HestenesStiefel",
    "Momentum",
    "Nesterov",
    "RMSProp",
    "TorchEquivalent",
    "create",
    "needs_closure",
    "optimizer_names",
    "torch_equivalent",
    "torch_optimizers",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adagrad": Adagrad,
    "rmsprop": RMSProp,
    "adadelta": Adadelta,
    "adam": Adam,
    "cg-fr": FletcherReeves,
    "cg-hs": HestenesStiefel,
}


def torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """``torch-<lowercased class name>`` -> each optimizer class of ``torch.optim`` (``torch-adamw``...)."""
    found = {}
    for attribute in dir(torch.optim):
        value = getattr(torch.optim, attribute)
        if (
            inspect.isclass(value)
            and issubclass(value, torch.optim.Optimizer)
            and value is not torch.optim.Optimizer
        ):
            found["torch-" + attribute.lower()] = value
    return found


def optimizer_names() -> list[str]:
    """Every accepted optimizer name: ours (:data:`OPTIMIZERS`), then ``torch-<name>`` in sorted order."""
    return list(OPTIMIZERS) + sorted(torch_optimizers())


def _check_name(name: str) -> type[torch.optim.Optimizer]:
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    torch_classes = torch_optimizers() if name.startswith("torch-") else {}
    if name in torch_classes:
        return torch_classes[name]
    raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}")


def create(name: str, params: Iterable[Any], **hyperparameters: Any) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``params``; unknown names and hyper-parameters raise ConfigError.

    ``name`` is one of ours (:data:`OPTIMIZERS`) or ``torch-<name>`` for the ``torch.optim`` class whose
    lowercased name is ``<name>`` (``torch-sgd`` is ``torch.optim.SGD``, ``torch-adamw`` is ``AdamW``).
    ``lr=None`` keeps the optimizer's default learning rate.
    """
    cls = _check_name(name)
    if hyperparameters.get("lr", 0) is None:
        del hyperparameters["lr"]
    try:
        return cls(params, **hyperparameters)
    except TypeError as error:
        raise ConfigError(f"optimizer {name}: {error}; check --optimizer-option names") from error


def needs_closure(name: str) -> bool:
    """True when ``step()`` must be given a closure that re-evaluates the loss (CG, L-BFGS)."""
    cls = _check_name(name)
    return issubclass(cls, (ConjugateGradient, torch.optim.LBFGS))


@dataclass(frozen=True)
class TorchEquivalent:
    """The ``torch.optim`` optimizer that follows the same trajectory as one of ours."""

    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    note: str = ""

    def create(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        return self.cls(params, **self.kwargs)


def torch_equivalent(name: str, **hyperparameters: Any) -> TorchEquivalent:
    """The ``torch.optim`` class and arguments equal to ``create(name, params, **hyperparameters)``.

    ``exact`` is False where the formulas differ by ``eps`` placement only (RMSProp, and Adam with the
    default ``eps_hat=True``): the trajectories then agree while ``eps`` is small against ``sqrt(s)``.
    Raises ConfigError for the CG methods, which ``torch.optim`` does not have.
    """
    cls = _check_name(name)
    if issubclass(cls, ConjugateGradient):
        raise ConfigError(f"torch.optim has no {name}; compare it with scipy.optimize.minimize(method='CG')")
    # The defaults of our class, overridden by the caller's values.
    probe = cls([torch.zeros(1, requires_grad=True)], **hyperparameters)
    h = probe.defaults
    common = {"lr": h["lr"], "weight_decay": h["weight_decay"], "foreach": h["foreach"]}
    if name == "sgd":
        return TorchEquivalent(torch.optim.SGD, common)
    if name in ("momentum", "nesterov"):
        kwargs = {**common, "momentum": h["momentum"], "nesterov": name == "nesterov", "dampening": 0.0}
        return TorchEquivalent(torch.optim.SGD, kwargs, note="exact while lr is constant")
    if name == "adagrad":
        kwargs = {**common, "eps": 0.0, "initial_accumulator_value": h["eps"], "lr_decay": 0.0}
        return TorchEquivalent(torch.optim.Adagrad, kwargs, note="eps moved into the accumulator")
    if name == "rmsprop":
        kwargs = {**common, "alpha": h["decay"], "eps": h["eps"]}
        return TorchEquivalent(
            torch.optim.RMSprop, kwargs, exact=False, note="torch has no eps inside the square root"
        )
    if name == "adadelta":
        return TorchEquivalent(torch.optim.Adadelta, {**common, "rho": h["decay"], "eps": h["eps"]})
    # adam
    if h["count"] != "step":
        raise ConfigError("torch.optim.Adam counts steps; use count='step' to compare with it")
    kwargs = {**common, "betas": h["betas"], "eps": h["eps"]}
    if h["eps_hat"]:
        return TorchEquivalent(
            torch.optim.Adam, kwargs, exact=False, note="eps_hat=True adds eps before bias correction"
        )
    return TorchEquivalent(torch.optim.Adam, kwargs)
