"""What a run reports: the progress display, the summary (a dict in the metrics, a table on the terminal).

Progress, on the process that does the job's I/O: a rich bar on stderr when it is a terminal, and when
stdout is not one (nohup, a batch scheduler, a pipe) one plain line every ``--progress-every`` seconds,
flushed at once::

    train step 120/600 (20%)  loss 0.5123  test acc 0.8011  1,234 samples/s  ETA 0:00:42

``samples/s`` is the job's (every replica's samples) since the previous line; the ETA extrapolates this
run's pace. ``--quiet`` shows neither; ``--progress off`` neither.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.metrics import MetricRecord
from distlearn.models import count_parameters

__all__ = [
    "Progress",
    "TrainResult",
    "Window",
    "print_summary",
    "progress_wanted",
    "run_summary",
    "served_result",
    "status_of",
]


@dataclass
class TrainResult:
    """What :func:`train` returns. Accuracies are fractions in [0, 1]; times are seconds."""

    model: nn.Module
    test_accuracy: float | None
    """None when the targets are not class labels (regression, sequences): accuracy means nothing."""
    test_loss: float
    best_accuracy: float
    steps: int
    epochs: float
    samples_per_s: float
    train_seconds: float
    wall_time: float
    seconds_per_epoch: list[float]
    metrics_path: Path | None
    checkpoint: Path | None
    evaluations: list[MetricRecord]
    summary: dict[str, Any]


class Window:
    """The training records' accumulators: tensors, so no ``.item()`` except when a record is written."""

    def __init__(self, classify: bool = True, device: torch.device | None = None) -> None:
        self.classify = classify  # targets are class labels: count arg-max hits
        self.loss = torch.zeros((), device=device)  # on the run's device: no synchronisation per step
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.samples = 0
        self.started = time.perf_counter()
        self.comm = 0.0  # seconds of the window spent blocked in the strategy's step hooks (communication)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.samples += len(y)
        self.loss += loss.detach() * len(y)
        if self.classify:
            self.correct += (logits.argmax(dim=1) == y).sum()

    def state_dict(self) -> dict[str, Any]:
        """The window so far, for a checkpoint: a resumed run's first record then covers the same steps."""
        return {
            "loss": self.loss.clone(),
            "correct": self.correct.clone(),
            "samples": self.samples,
            "comm": self.comm,
            "elapsed": time.perf_counter() - self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.copy_(state["loss"])
        self.correct.copy_(state["correct"])
        self.samples, self.comm = state["samples"], state["comm"]
        self.started = time.perf_counter() - state["elapsed"]

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.samples = 0
        self.comm = 0.0
        self.started = time.perf_counter()


class Progress:
    """The progress display of the main rank: a rich bar, plain lines, both or none (each call is cheap).

    Args:
        bar: show the rich bar (on stderr).
        lines_every: seconds between plain lines on stdout (None: no lines).
        total, done: the run's steps, and those done before this process (a resumed run).
        replicas: processes whose samples make the job's samples/s (each reports its own ``samples``).
    """

    def __init__(
        self, bar: bool, lines_every: float | None, total: int, done: int, replicas: int = 1
    ) -> None:
        self._bar = None
        self.lines_every, self.total, self.replicas = lines_every, total, replicas
        self.started = self._last_time = time.perf_counter()
        self.first_step = self._last_step = self._step = done
        self._samples = self._last_samples = 0
        self._status: dict[str, str] = {}
        if not bar:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task("train", total=total, completed=done, status="")
        self._bar.start()

    def update(self, completed: int, status: str | None = None, samples: int | None = None) -> None:
        """``completed`` steps; ``status`` e.g. ``"loss 0.51"``; ``samples`` this process's so far."""
        self._step = completed
        if samples is not None:
            self._samples = samples
        if status is not None:
            self._status[status.split()[0]] = status  # the latest "loss ..." and "test ..." both show
        if self._bar is not None:
            fields = {} if status is None else {"status": status}
            self._bar.update(self._task, completed=completed, **fields)
        if self.lines_every is not None and time.perf_counter() - self._last_time >= self.lines_every:
            self._line()

    def line(self) -> str:
        """The plain progress line of now (and the rate since the previous line)."""
        now = time.perf_counter()
        step, total = self._step, self.total
        rate = (self._samples - self._last_samples) * self.replicas / max(now - self._last_time, 1e-9)
        done = step - self.first_step
        eta = (now - self.started) / done * (total - step) if done > 0 else None
        words = [f"train step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
        words += [self._status[key] for key in ("loss", "test") if key in self._status]
        words.append(f"{rate:,.0f} samples/s")
        words.append("ETA " + (str(datetime.timedelta(seconds=round(eta))) if eta is not None else "-"))
        return "  ".join(words)

    def _line(self) -> None:
        print(self.line(), flush=True)
        self._last_time, self._last_step, self._last_samples = time.perf_counter(), self._step, self._samples

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.lines_every is not None and self._step != self._last_step:
            self._line()  # where the run ended
            self.lines_every = None


def status_of(record: MetricRecord) -> str:
    """An evaluation for the progress display."""
    return f"test loss {record.loss:.4f}" if record.accuracy is None else f"test acc {record.accuracy:.4f}"


def progress_wanted(config: Any, is_main: bool) -> tuple[bool, float | None]:
    """(the bar, the plain lines' period) that ``config`` asks of this process."""
    if not is_main or config.quiet or config.progress == "off":
        return False, None
    bar = config.progress == "on" or sys.stderr.isatty()
    return bar, None if sys.stdout.isatty() else config.progress_every


# -- the loop ----------------------------------------------------------------------------------------------


def print_summary(
    summary: dict[str, Any], samples_per_s: float, wall_time: float, metrics_path: Path
) -> None:
    from rich.console import Console
    from rich.table import Table

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    table = Table(title="distlearn train: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    dataset = f"{summary['dataset']} ({summary['train_examples']} train / {summary['test_examples']} test)"
    rows = [
        ("dataset", dataset),
        ("data note", summary["dataset_note"]),
        ("model", f"{summary['model']} ({summary['parameters']:,} parameters)"),
        (
            "optimizer",
            f"{summary['optimizer']} ({summary['optimizer_class']}), schedule {summary['schedule']}",
        ),
        ("strategy", f"{summary['strategy']}, global batch {summary['global_batch']}"),
        ("device", summary.get("device")),
        (
            "steps",
            f"{summary['steps']} ({summary['epochs']:.2f} epochs)"
            + (
                f", resumed from step {summary['resumed_from_step']}: {summary['steps_this_run']} in this run"
                if summary.get("resumed_from_step") is not None
                else ""
            )
            + (f", {summary['skipped_steps']} skipped (non-finite)" if summary.get("skipped_steps") else ""),
        ),
        (
            "test accuracy",
            f"{percent(summary['test_accuracy'])} (best {percent(summary['best_accuracy'])})"
            if summary.get("classification", True)
            else "none (the targets are not class labels)",
        ),
        ("test loss", "-" if summary["test_loss"] is None else f"{summary['test_loss']:.4f}"),
        (
            "throughput",
            f"{summary['job_samples_per_s']:,.0f} samples/s"
            + (
                f" ({summary['replicas']} replicas x {samples_per_s:,.0f}, {summary['threads']} threads each)"
                if summary["replicas"] > 1
                else f" ({summary['threads']} threads)"
            ),
        ),
        (
            "time",
            f"{wall_time:.1f} s wall, {summary['train_seconds']:.1f} s training"
            + (" (this run)" if summary.get("resumed_from_step") is not None else "")
            + (
                f", {sum(summary['seconds_per_epoch']) / len(summary['seconds_per_epoch']):.1f} s per epoch"
                if summary["seconds_per_epoch"]
                else ""
            ),
        ),
        ("staleness", _staleness(summary)),
        ("metrics", str(metrics_path)),
        ("checkpoint", summary["checkpoint"]),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, str(value))
    Console().print(table)


def run_summary(run: Any, final: MetricRecord | None) -> dict[str, Any]:
    """The summary of a finished run (the trainer's ``_Run``): the metrics' summary record and the table."""
    config, state, data = run.config, run.state, run.data
    return {
        "dataset": getattr(data.train, "name", config.dataset),
        "dataset_source": getattr(data.train, "source", None),
        "dataset_note": getattr(data.train, "note", None),
        "train_examples": run.n_train,
        "test_examples": len(data.test_labels),
        "model": type(run.model).__name__ if run.user_model else config.model,
        "parameters": count_parameters(run.model),
        "optimizer": type(run.optimizer).__name__ if run.user_optimizer else config.optimizer,
        "optimizer_class": type(run.optimizer).__name__,
        "lr": config.lr,
        "schedule": config.schedule,
        "global_batch": run.global_batch,
        "strategy": run.strategy.describe(),
        "augment": repr(data.transform) if data.augment else "none",
        "steps": state.step,
        "resumed_from_step": run.resumed_from,
        "steps_this_run": state.step - (run.resumed_from or 0),
        "epochs": state.step / run.steps_per_epoch,
        "test_accuracy": final.accuracy if final else None,
        "test_loss": final.loss if final else None,
        "best_accuracy": state.best_accuracy if state.best_accuracy >= 0 else None,
        "train_seconds": run.train_seconds,
        "seconds_per_epoch": state.seconds_per_epoch,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "seed": config.seed,
        "threads": torch.get_num_threads(),
        "replicas": run.strategy.replicas,
        "device": str(run.device),
        "classification": run.data.classification,
        **run.strategy.run_summary(),
    }


def _staleness(summary: dict[str, Any]) -> str | None:
    """The parameter server's staleness row: mean and max over this worker's pushes (None: no such run)."""
    if summary.get("staleness_pushes") is None:
        return None
    if summary.get("staleness_mean") is None:
        return f"none measured ({summary['staleness_pushes']} pushes)"
    dropped = summary.get("pushes_dropped") or 0
    return (
        f"mean {summary['staleness_mean']:.2f}, max {summary['staleness_max']} versions "
        f"(this worker's {summary['staleness_pushes']} pushes"
        + (f", {dropped} dropped as late)" if dropped else ")")
    )


def served_result(strategy: Any) -> TrainResult:
    """The result a rank that only serves (a parameter server) returns: no model, no accuracy."""
    return TrainResult(
        model=nn.Identity(),
        test_accuracy=math.nan,
        test_loss=math.nan,
        best_accuracy=math.nan,
        steps=0,
        epochs=0.0,
        samples_per_s=0.0,
        train_seconds=0.0,
        wall_time=0.0,
        seconds_per_epoch=[],
        metrics_path=None,
        checkpoint=None,
        evaluations=[],
        summary={"role": strategy.role, "strategy": strategy.describe()},
    )
