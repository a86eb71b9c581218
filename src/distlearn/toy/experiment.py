"""The toy benchmark end to end: run the optimizers on each problem, write PNG, GIF and JSON, summarize.

This is what ``distlearn toy`` does, callable from Python with a :class:`~distlearn.toy.config.ToyConfig`::

    >>> from distlearn.toy import ToyConfig, run_toy
    >>> results = run_toy(ToyConfig(function="beale", optimizers="sgd,adam", steps=200, out="/tmp/toy"))
    >>> results[0].rows[1].optimizer
    'adam'

The JSON file holds everything needed to redraw the pictures or recompute the table: the problem (start,
minima, f*), the settings, and each optimizer's raw trajectory (points, losses, gradient evaluations).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import distlearn
from distlearn.errors import ConfigError, require_extra
from distlearn.toy.config import ToyConfig
from distlearn.toy.functions import TestFunction
from distlearn.toy.problems import get_problem, resolve_problems
from distlearn.toy.runner import Trajectory, resolve_optimizers, run_optimizers, steps_to_tolerance

__all__ = ["ProblemResult", "Row", "parse_lr", "run_toy", "summarize"]


@dataclass
class Row:
    """One line of the table: steps (and gradient evaluations) to tolerance, or None, and the final gap."""

    optimizer: str
    lr: float
    steps_to_tolerance: int | None
    evaluations_to_tolerance: int | None
    final_gap: float
    final_point: list[float]
    diverged: bool


@dataclass
class ProblemResult:
    problem: str
    rows: list[Row]
    files: list[Path]


def parse_lr(spec: str | float | None, optimizers: list[str]) -> float | dict[str, float] | None:
    """``None``, one number for all (``"0.01"``), or ``"name=value,..."`` per optimizer."""
    if spec is None or isinstance(spec, (int, float)):
        return None if spec is None else float(spec)
    spec = spec.strip()
    try:
        if "=" not in spec:
            return float(spec)
        mapping = {}
        for item in spec.split(","):
            name, _, value = item.partition("=")
            mapping[name.strip()] = float(value)
    except ValueError:
        raise ConfigError(
            f"cannot read --lr {spec!r}; give one number (--lr 0.01) "
            "or one per optimizer (--lr adam=0.05,sgd=1e-3)"
        ) from None
    resolve_optimizers(list(mapping))
    return mapping


def summarize(problem: TestFunction, runs: dict[str, Trajectory], tolerance: float) -> list[Row]:
    """The table rows for ``runs`` on ``problem``."""
    rows = []
    for name, trajectory in runs.items():
        reached = steps_to_tolerance(trajectory.losses, problem.minimum_value, tolerance)
        rows.append(
            Row(
                optimizer=name,
                lr=trajectory.lr,
                steps_to_tolerance=reached,
                evaluations_to_tolerance=None
                if reached is None
                else trajectory.gradient_evaluations[reached],
                final_gap=math.inf if trajectory.diverged else trajectory.losses[-1] - problem.minimum_value,
                final_point=trajectory.points[-1],
                diverged=trajectory.diverged,
            )
        )
    return rows


def _validate(config: ToyConfig) -> None:
    if config.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {config.steps}")
    if not config.tolerance > 0:
        raise ConfigError(f"--tolerance must be positive, got {config.tolerance}; try 1e-6")
    if config.frames < 2:
        raise ConfigError(f"--frames must be at least 2, got {config.frames}")
    if config.start is not None and len(config.start) != 2:
        raise ConfigError(f"--start takes two numbers X Y, got {list(config.start)}")


def run_toy(config: ToyConfig) -> list[ProblemResult]:
    """Run ``config`` and write ``<out>/<problem>.{png,gif,json}`` for every chosen problem."""
    for module in ("matplotlib", "PIL"):  # only when drawing
        require_extra(module, "plot", "distlearn toy's contour plots and GIFs")
    from distlearn.toy.plots import save_animation, save_contour_plot

    _validate(config)
    problems = resolve_problems(config.function)
    optimizers = resolve_optimizers(config.optimizers)
    lr = parse_lr(config.lr, optimizers)
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create output directory {out}: {error}; pass a writable --out DIR"
        ) from None
    results = []
    for name in problems:
        problem = get_problem(name)
        runs = run_optimizers(problem, optimizers, steps=config.steps, lr=lr, start=config.start)
        if config.start is not None:
            problem = _with_start(problem, config.start)
        rows = summarize(problem, runs, config.tolerance)
        files = [save_contour_plot(out / f"{name}.png", problem, runs, tolerance=config.tolerance)]
        if config.gif:
            files.append(save_animation(out / f"{name}.gif", problem, runs, frames=config.frames))
        files.append(_save_json(out / f"{name}.json", problem, runs, rows, config))
        results.append(ProblemResult(problem=name, rows=rows, files=files))
    return results


def _with_start(problem: TestFunction, start: tuple[float, ...]) -> TestFunction:
    from dataclasses import replace

    return replace(problem, start=(float(start[0]), float(start[1])))


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _save_json(
    path: Path, problem: TestFunction, runs: dict[str, Trajectory], rows: list[Row], config
) -> Path:
    record: dict[str, Any] = {
        "problem": {
            "name": problem.name,
            "formula": problem.formula,
            "start": list(problem.start),
            "window": list(problem.window),
            "minima": [list(m) for m in problem.minima],
            "minimum_value": problem.minimum_value,
        },
        "config": asdict(config),
        "table": [{**asdict(row), "final_gap": _finite(row.final_gap)} for row in rows],
        "runs": {name: trajectory.to_dict() for name, trajectory in runs.items()},
        "versions": {
            "distlearn": distlearn.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    path.write_text(json.dumps(record, indent=1))
    return path
