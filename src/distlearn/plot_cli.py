"""``distlearn plot RUN...``: loss and accuracy curves of several runs, against steps and wall time.

Run manual::

    distlearn plot runs/adam runs/sgd --out runs/curves.png
    distlearn plot runs/*/metrics.jsonl --out curves.png --title "LeNet, Fashion-MNIST"

Each RUN is a run directory (holding ``metrics.jsonl``) or a metrics file. The figure has four panels:
training loss and test accuracy, each against optimizer steps and against wall-clock seconds; for RL runs
(``distlearn rl``) the mean episode return takes the place of the test accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distlearn.errors import ConfigError, require_extra
from distlearn.metrics import MetricRecord, load_runs

__all__ = ["add_arguments", "plot_runs", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distlearn plot`` options."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or metrics.jsonl files")
    parser.add_argument("--out", default="runs/curves.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--title", default=None, help="figure title (default: none)")


def _value(record: MetricRecord, key: str) -> float | None:
    value = getattr(record, key) if hasattr(record, key) else record.extra.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _series(records: list[MetricRecord], kind: str, key: str, x: str) -> tuple[list[float], list[float]]:
    points = [
        (getattr(r, x), _value(r, key)) for r in records if r.kind == kind and _value(r, key) is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _is_rl(records: list[MetricRecord]) -> bool:
    """An RL run (``distlearn rl``): its train records carry the mean episode return, it has no test set."""
    return any(r.kind == "train" and "episode_return" in r.extra for r in records)


def plot_runs(runs: list[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Draw the curves of ``runs`` into the PNG ``out`` and return its path."""
    matplotlib = require_extra("matplotlib", "plot", "distlearn plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_runs(list(runs))
    if not any(any(r.kind in ("train", "eval") for r in records) for records in data.values()):
        raise ConfigError("none of the runs has train or eval records yet; train first or pass other runs")
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    # RL runs have no test accuracy: their right-hand panels show the mean return of the last 100 episodes
    rl = all(_is_rl(records) for records in data.values())
    second = (
        ("train", "episode_return", "mean episode return (100)")
        if rl
        else ("eval", "accuracy", "test accuracy")
    )
    panels = [
        (axes[0, 0], "train", "loss", "step", "training loss"),
        (axes[0, 1], second[0], second[1], "step", second[2]),
        (axes[1, 0], "train", "loss", "wall_time", "training loss"),
        (axes[1, 1], second[0], second[1], "wall_time", second[2]),
    ]
    for axis, kind, key, x, label in panels:
        for name, records in data.items():
            xs, ys = _series(records, kind, key, x)
            if xs:
                axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        axis.set_xlabel(("updates" if rl else "optimizer steps") if x == "step" else "wall time (s)")
        axis.set_ylabel(label)
        losses = [y for records in data.values() for y in _series(records, kind, key, x)[1]]
        if key == "loss" and losses and min(losses) > 0:  # an RL loss can be negative: linear then
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0, 1].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def run(args: argparse.Namespace) -> int:
    """Plot from parsed arguments; returns the exit status."""
    path = plot_runs(args.runs, args.out, title=args.title)
    print(f"wrote {path}")
    return 0
