"""The toy problems: 2-D test functions and small learning tasks, optimizers from one start, pictures.

See docs/toy-problems.md. Main entry points: :func:`run_toy` (what ``distlearn toy`` runs),
:func:`run_optimizers` (trajectories), :data:`FUNCTIONS` and :func:`get_problem`.
"""

from __future__ import annotations

from distlearn.toy.config import ToyConfig
from distlearn.toy.experiment import run_toy
from distlearn.toy.functions import FUNCTIONS, TestFunction, get_function
from distlearn.toy.problems import PROBLEM_NAMES, get_problem
from distlearn.toy.runner import Trajectory, run_optimizer, run_optimizers, steps_to_tolerance
from distlearn.toy.tasks import Task, linear_regression, logistic_regression

__all__ = [
    "FUNCTIONS",
    "PROBLEM_NAMES",
    "Task",
    "TestFunction",
    "ToyConfig",
    "Trajectory",
    "get_function",
    "get_problem",
    "linear_regression",
    "logistic_regression",
    "run_optimizer",
    "run_optimizers",
    "run_toy",
    "steps_to_tolerance",
]
