"""Run optimizers from the same start on a toy problem and record where they go.

Every optimizer starts at the problem's ``start`` and takes ``steps`` steps on the exact (full-batch)
gradient, the setting of the overview's toy benchmark (Arnold 2016, section 2). For each one we record the
point ``z_t`` and loss ``f(z_t)`` after every step and the cumulative number of gradient evaluations, which
differs from the step count for methods with a line search (conjugate gradients call the closure several
times per step, the ``torch.optim.LBFGS`` convention). "Steps to tolerance" is the first ``t`` with
``f(z_t) - f* <= tolerance``.

Learning rates: an explicit ``lr`` wins; otherwise each (problem, optimizer) pair uses the value tuned by
the grid in :mod:`distlearn.toy.tune` (the table in :mod:`distlearn.toy.tuned`).

Example::

    >>> from distlearn.toy.functions import get_function
    >>> runs = run_optimizers(get_function("rosenbrock"), ["sgd", "adam"], steps=100)
    >>> runs["adam"].losses[-1] < runs["adam"].losses[0]
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from distlearn import optim
from distlearn.errors import ConfigError
from distlearn.toy.functions import TestFunction
from distlearn.toy.tuned import FALLBACK_LR, TUNED_LR

__all__ = [
    "Trajectory",
    "default_lr",
    "optimizer_names",
    "resolve_optimizers",
    "run_optimizer",
    "run_optimizers",
    "steps_to_tolerance",
]

# A run whose loss leaves this range has diverged; we stop recording it there.
DIVERGENCE_LIMIT = 1e30


def optimizer_names() -> list[str]:
    """Every optimizer name ``--optimizers all`` stands for, in registry order."""
    return list(optim.OPTIMIZERS)


def resolve_optimizers(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, ``"a,b,c"`` or a list of names, validated against the registry, in the given order."""
    known = optimizer_names()
    if isinstance(spec, str):
        names = known if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if not names:
        raise ConfigError(
            f"no optimizer given; pass --optimizers all or a list such as {','.join(known[:3])}"
        )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown optimizer(s) {', '.join(map(repr, unknown))}; known optimizers are: {', '.join(known)} "
            f"(or 'all'), e.g. --optimizers sgd,adam"
        )
    return names


def default_lr(problem: str, optimizer: str) -> float:
    """The tuned learning rate for ``optimizer`` on ``problem`` (see :mod:`distlearn.toy.tune`)."""
    return TUNED_LR.get(problem, {}).get(optimizer, FALLBACK_LR.get(optimizer, 1e-3))


@dataclass
class Trajectory:
    """One optimizer's run: ``points[t]`` and ``losses[t]`` after ``t`` steps (t = 0 is the start).

    ``gradient_evaluations[t]`` counts the loss-and-gradient evaluations used by the first ``t`` steps.
    ``diverged`` is set when the loss became non-finite or exceeded ``DIVERGENCE_LIMIT``; the
    trajectory then ends at the last finite point.
    """

    optimizer: str
    lr: float
    points: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    gradient_evaluations: list[int] = field(default_factory=list)
    diverged: bool = False

    @property
    def steps(self) -> int:
        return len(self.points) - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trajectory:
        return cls(**data)


def steps_to_tolerance(losses: Sequence[float], minimum_value: float, tolerance: float) -> int | None:
    """The first step ``t`` with ``losses[t] - minimum_value <= tolerance``, or None if never reached."""
    if tolerance <= 0:
        raise ConfigError(f"tolerance must be positive, got {tolerance}; try 1e-6")
    for t, loss in enumerate(losses):
        if loss - minimum_value <= tolerance:
            return t
    return None


def run_optimizer(
    problem: TestFunction,
    optimizer: str,
    *,
    steps: int,
    lr: float | None = None,
    start: Sequence[float] | None = None,
    hparams: Mapping[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Trajectory:
    """Run ``optimizer`` for ``steps`` steps on ``problem`` from ``start`` (default: the problem's start).

    Computation is in float64, so the recorded trajectory is reproducible to the last bit and rounding
    does not hide convergence at small tolerances. ``should_stop``, called before every step, ends the run
    early when it returns true (the live page's server stops a computation on Ctrl-C or past its deadline);
    the trajectory then holds the steps done so far.
    """
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}; try --steps 500")
    resolve_optimizers([optimizer])
    lr = default_lr(problem.name, optimizer) if lr is None else float(lr)
    if not lr > 0:
        raise ConfigError(f"learning rate must be positive, got {lr} for {optimizer}; try --lr 1e-3")
    initial = problem.initial_point() if start is None else torch.tensor(list(start), dtype=torch.float64)
    z = initial.clone().requires_grad_(True)
    optimizer_object = optim.create(optimizer, [z], lr=lr, **dict(hparams or {}))
    with_closure = optim.needs_closure(optimizer)

    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer_object.zero_grad()
        loss = problem(z)
        loss.backward()
        return loss

    trajectory = Trajectory(optimizer=optimizer, lr=lr)
    trajectory.points.append(z.detach().tolist())
    trajectory.losses.append(float(problem(z.detach())))
    trajectory.gradient_evaluations.append(0)
    for _ in range(steps):
        if should_stop is not None and should_stop():
            break
        if with_closure:
            optimizer_object.step(closure)
        else:
            closure()
            optimizer_object.step()
        with torch.no_grad():
            point = z.detach()
            loss = float(problem(point))
        if not (math.isfinite(loss) and abs(loss) < DIVERGENCE_LIMIT and bool(torch.isfinite(point).all())):
            trajectory.diverged = True
            break
        trajectory.points.append(point.tolist())
        trajectory.losses.append(loss)
        trajectory.gradient_evaluations.append(evaluations)
    return trajectory


def run_optimizers(
    problem: TestFunction,
    optimizers: str | Sequence[str],
    *,
    steps: int,
    lr: float | Mapping[str, float] | None = None,
    start: Sequence[float] | None = None,
) -> dict[str, Trajectory]:
    """Run each optimizer from the same start; ``lr`` is one value for all, a per-optimizer map, or None.

    Optimizers missing from a map use their tuned default for this problem.
    """
    names = resolve_optimizers(optimizers)
    if isinstance(lr, Mapping):
        resolve_optimizers(list(lr))
    runs = {}
    for name in names:
        chosen = lr.get(name) if isinstance(lr, Mapping) else lr
        runs[name] = run_optimizer(problem, name, steps=steps, lr=chosen, start=start)
    return runs
