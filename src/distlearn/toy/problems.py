"""Every toy problem by name: the 2-D test functions and the 2-feature learning tasks, one registry.

Example::

    >>> from distlearn.toy.problems import get_problem
    >>> get_problem("logistic-regression").minimum_value > 0
    True
"""

from __future__ import annotations

from collections.abc import Callable

from distlearn.errors import ConfigError
from distlearn.toy.functions import FUNCTIONS, TestFunction
from distlearn.toy.tasks import linear_regression, logistic_regression

__all__ = ["PROBLEM_NAMES", "get_problem", "resolve_problems"]

_TASKS: dict[str, Callable[[], TestFunction]] = {
    "linear-regression": lambda: linear_regression().as_test_function(),
    "logistic-regression": lambda: logistic_regression().as_test_function(),
}

PROBLEM_NAMES: tuple[str, ...] = (*FUNCTIONS, *_TASKS)


def get_problem(name: str) -> TestFunction:
    """The problem called ``name``; an unknown name raises ConfigError naming the known ones."""
    if name in FUNCTIONS:
        return FUNCTIONS[name]
    if name in _TASKS:
        return _TASKS[name]()
    raise ConfigError(
        f"unknown toy function {name!r}; choose one of: {', '.join(PROBLEM_NAMES)} (or 'all'), "
        f"e.g. --function rosenbrock"
    )


def resolve_problems(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list of problem names, validated, in order."""
    names = (
        list(PROBLEM_NAMES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    )
    if not names:
        raise ConfigError("no toy function given; pass --function NAME or --function all")
    for name in names:
        get_problem(name)  # raises with the list of known names
    return names
