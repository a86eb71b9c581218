"""``distlearn toy``: optimizers from one start on 2-D problems; contour plot, animated GIF, steps table.

Run manual::

    distlearn toy --function rosenbrock --optimizers all --out runs/toy      # what `make run` does
    distlearn toy --function all --optimizers sgd,momentum,adam --steps 500
    distlearn toy --config toy.toml --steps 200       # file values, overridden by flags that are given

Writes ``OUT/<function>.png`` (trajectories over log-spaced contours, and f - f* per step),
``OUT/<function>.gif`` (the paths drawn step by step) and ``OUT/<function>.json`` (raw trajectories), then
prints each function's table: steps (and gradient evaluations) to reach f - f* <= tolerance, or
"not reached", and the final f - f*.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from rich.console import Console
from rich.table import Table

from distlearn.config import add_arguments as add_config_arguments
from distlearn.config import from_args, load_toml
from distlearn.toy.config import ToyConfig
from distlearn.toy.experiment import ProblemResult, run_toy

__all__ = ["add_arguments", "config_from_args", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distlearn toy`` options: one per :class:`ToyConfig` field, plus ``--config FILE``."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with ToyConfig fields; flags override it")
    add_config_arguments(parser, ToyConfig)


def config_from_args(args: argparse.Namespace) -> ToyConfig:
    """The config from parsed flags; with ``--config``, file values fill every flag left at its default."""
    flags = from_args(ToyConfig, args)
    if not getattr(args, "config", None):
        return flags
    base = load_toml(ToyConfig, args.config)
    defaults = ToyConfig()
    changed = {
        f.name: getattr(flags, f.name)
        for f in dataclasses.fields(ToyConfig)
        if getattr(flags, f.name) != getattr(defaults, f.name)
    }
    return dataclasses.replace(base, **changed)


def _table(result: ProblemResult, tolerance: float) -> Table:
    table = Table(title=f"{result.problem}: steps to f - f* <= {tolerance:g}")
    for column in ("optimizer", "lr", "steps to tol", "grad evals to tol", "final f - f*", "final point"):
        table.add_column(column, justify="left" if column in ("optimizer", "final point") else "right")
    for row in result.rows:
        reached = "not reached" if row.steps_to_tolerance is None else str(row.steps_to_tolerance)
        evaluations = "-" if row.evaluations_to_tolerance is None else str(row.evaluations_to_tolerance)
        gap = "diverged" if row.diverged or not math.isfinite(row.final_gap) else f"{row.final_gap:.3g}"
        point = "(" + ", ".join(f"{v:.4g}" for v in row.final_point) + ")"
        table.add_row(row.optimizer, f"{row.lr:.3g}", reached, evaluations, gap, point)
    return table


def run(args: argparse.Namespace) -> int:
    """Run the toy benchmark from parsed arguments; returns the exit status."""
    config = config_from_args(args)
    console = Console(width=max(Console().width, 120))
    for result in run_toy(config):
        console.print(_table(result, config.tolerance))
        console.print("wrote " + ", ".join(str(p) for p in result.files))
    return 0
