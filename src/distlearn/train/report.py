"""What a run reports: the progress bar, the summary (a dict in the metrics, a table on the terminal)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.metrics import MetricRecord

__all__ = ["Progress", "TrainResult", "Window", "print_summary", "served_result"]


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

    def __init__(self, classify: bool = True) -> None:
        self.classify = classify  # targets are class labels: count arg-max hits
        self.loss = torch.zeros(())
        self.correct = torch.zeros((), dtype=torch.int64)
        self.samples = 0
        self.started = time.perf_counter()
        self.comm = 0.0  # seconds of the window spent blocked in the strategy's step hooks (communication)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.samples += len(y)
        self.loss += loss.detach() * len(y)
        if self.classify:
            self.correct += (logits.argmax(dim=1) == y).sum()

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.samples = 0
        self.comm = 0.0
        self.started = time.perf_counter()


class Progress:
    """A rich progress bar on the main rank when wanted; otherwise every call is a no-op."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self._bar = None
        if not enabled:
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

    def update(self, completed: int, status: str | None = None) -> None:
        if self._bar is not None:
            fields = {} if status is None else {"status": status}
            self._bar.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


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
        (
            "steps",
            f"{summary['steps']} ({summary['epochs']:.2f} epochs)"
            + (
                f", resumed from step {summary['resumed_from_step']}: {summary['steps_this_run']} in this run"
                if summary.get("resumed_from_step") is not None
                else ""
            ),
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
        ("metrics", str(metrics_path)),
        ("checkpoint", summary["checkpoint"]),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, str(value))
    Console().print(table)


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
