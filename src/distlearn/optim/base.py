"""What every distlearn optimizer shares: validation, the step driver and the two update paths.

An optimizer here is three layers, as in ``torch.optim``:

1. a :class:`torch.optim.Optimizer` subclass holding param groups, per-parameter state and the
   validation of its hyper-parameters (:class:`distlearn.errors.ConfigError`, a ``ValueError``);
2. :meth:`FirstOrderOptimizer.step`, the driver: it evaluates the closure if one is given, collects the
   parameters that have a gradient, creates missing state, and calls one of the two paths;
3. the paths: ``_single`` -- a readable per-tensor loop that spells the update rule out -- and
   ``_foreach`` -- the same update on whole lists of tensors with ``torch._foreach_*`` kernels, which pay
   Python's per-operation overhead once per step instead of once per tensor. The tests hold the fast
   path to the readable one.

``foreach=None`` (the default) picks the batched path whenever the parameters are dense tensors, on CPU
too; ``torch.optim`` defaults to its per-tensor loop on CPU. ``foreach=False`` forces the readable path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from distlearn.errors import ConfigError

__all__ = ["FirstOrderOptimizer", "check_nonnegative", "check_unit_interval"]


def check_nonnegative(name: str, value: float, optimizer: str, hint: str) -> None:
    """Raise ConfigError unless ``value`` is a finite number >= 0."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (0.0 <= float(value) < float("inf"))
    ):
        raise ConfigError(f"{optimizer}: {name} must be a finite number >= 0, got {value!r}; {hint}")


def check_unit_interval(name: str, value: float, optimizer: str, hint: str) -> None:
    """Raise ConfigError unless ``0 <= value < 1``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{optimizer}: {name} must lie in [0, 1), got {value!r}; {hint}")


class FirstOrderOptimizer(torch.optim.Optimizer):
    """Base class of the first-order optimizers: one update per ``step()`` from the stored gradients.

    Subclasses set ``state_names`` (the per-parameter buffers, created as zeros) and implement
    ``_single(group, param, grad, state)`` and ``_foreach(group, params, grads, states)``.
    Every group takes ``lr``, ``weight_decay`` (L2: ``g <- g + weight_decay * W`` before the update) and
    ``foreach``.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        name = type(self).__name__
        check_nonnegative("lr", defaults["lr"], name, "use a positive learning rate such as lr=1e-3")
        check_nonnegative("weight_decay", defaults.get("weight_decay", 0.0), name, "use e.g. 5e-4 or 0")
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one param group's hyper-parameters (groups may override the defaults)."""
        name = type(self).__name__
        check_nonnegative("lr", group["lr"], name, "use a positive learning rate such as lr=1e-3")
        check_nonnegative("weight_decay", group["weight_decay"], name, "use e.g. 5e-4 or 0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "defaults") and len(self.param_groups) > 1:
            self._check_group(self.param_groups[-1])

    def _use_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(not p.is_sparse for p in params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            states: list[dict[str, Any]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use dense embeddings (sparse=False) or torch.optim.SparseAdam"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for buffer in self.state_names:
                        state[buffer] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._initial_state(group, p, state)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            if not params:
                continue
            if group["weight_decay"]:
                if self._use_foreach(group, params):
                    grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
                else:
                    grads = [
                        g.add(p, alpha=group["weight_decay"]) for g, p in zip(grads, params, strict=True)
                    ]
            if self._use_foreach(group, params):
                self._foreach(group, params, grads, states)
            else:
                for p, g, state in zip(params, grads, states, strict=True):
                    self._single(group, p, g, state)
        return loss

    def _initial_state(self, group: dict[str, Any], param: torch.Tensor, state: dict) -> None:
        """Fill freshly created state buffers (they start as zeros)."""

    def _single(self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _foreach(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def _buffers(states: list[dict[str, Any]], name: str) -> list[torch.Tensor]:
        return [state[name] for state in states]
