"""The toy benchmark's settings: one dataclass for the CLI flags, a TOML file and the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ToyConfig"]


@dataclass
class ToyConfig:
    """What ``distlearn toy`` runs. Every field is a ``--flag`` and a TOML key of the same name."""

    function: str = field(
        default="rosenbrock",
        metadata={"help": "toy problem name, a comma-separated list, or 'all' (see docs/toy-problems.md)"},
    )
    optimizers: str = field(
        default="all", metadata={"help": "comma-separated optimizer names from distlearn.optim, or 'all'"}
    )
    steps: int = field(default=1000, metadata={"help": "steps every optimizer takes from the common start"})
    lr: str | None = field(
        default=None,
        metadata={
            "help": "learning rate: one value for all ('0.01') or per optimizer ('adam=0.05,sgd=1e-3'); "
            "unset ones use the value tuned for the function (distlearn.toy.tuned)"
        },
    )
    tolerance: float = field(
        default=1e-6, metadata={"help": "a run has converged at the first step with f - f* <= tolerance"}
    )
    start: tuple[float, ...] | None = field(
        default=None, metadata={"help": "start point X Y instead of the function's standard start"}
    )
    out: str = field(default="runs/toy", metadata={"help": "directory for <function>.png, .gif and .json"})
    gif: bool = field(default=True, metadata={"help": "write the animated GIF (--no-gif skips it)"})
    frames: int = field(default=60, metadata={"help": "frames in the animated GIF"})
