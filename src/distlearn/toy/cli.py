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

import math
import sys

from rich.console import Console
from rich.table import Table

from distlearn.config import parse
from distlearn.errors import DistlearnError
from distlearn.toy.config import ToyConfig
from distlearn.toy.experiment import ProblemResult, run_toy

__all__ = ["command", "parse_config"]


def parse_config(argv: list[str]) -> ToyConfig:
    """The config by the one merge rule: defaults < ``--config FILE`` (TOML or YAML) < the flags given."""
    return parse(ToyConfig, argv, prog="distlearn toy", description=__doc__.splitlines()[0])


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


def command(argv: list[str]) -> int:
    """``distlearn toy ARGS``: run the toy benchmark; returns the exit status (bad input: 2)."""
    try:
        config = parse_config(argv)
        console = Console(width=max(Console().width, 120))
        for result in run_toy(config):
            console.print(_table(result, config.tolerance))
            console.print("wrote " + ", ".join(str(p) for p in result.files))
    except DistlearnError as error:
        print(f"distlearn toy: error: {error}", file=sys.stderr)
        return 2
    return 0
