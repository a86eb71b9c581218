"""What a model-parallel (DNI) run records: the trainer's metrics records and the run's summary.

* ``kind="train"`` (:class:`TrainingLog`, on the top rank, the only one that sees the loss): every
  ``log_every`` steps, the mean training loss and accuracy since the previous record, training examples per
  second over the same window, ``wall_time`` in seconds since the run started, ``extra={"stage": K-1}``. The
  top rank writes them to ``metrics.rank<K-1>.jsonl`` at once (kept if the job dies) and sends them to rank
  0 after each epoch (``TRAIN_RECORD_FIELDS``, float64), which writes them into ``metrics.jsonl``;
* ``kind="eval"``: rank 0's test-set evaluation of the assembled network after each epoch;
* ``kind="summary"``: :func:`run_summary`, also written to ``summary.json``.

So ``distlearn plot OUT`` draws a DNI run's training loss and test accuracy like a trainer run's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import torch

from distlearn.comm.p2p import Transport
from distlearn.data.prepare import RunData
from distlearn.dni.config import DNIConfig
from distlearn.dni.worker import StageStats
from distlearn.metrics import MetricRecord, MetricsWriter

__all__ = ["RECORDS_FLAG", "TRAIN_RECORD_FIELDS", "TrainingLog", "run_summary", "train_records_of"]


TRAIN_RECORD_FIELDS = ("step", "wall_time", "loss", "accuracy", "samples_per_s", "bytes_sent")
"""The numbers of one training record as they travel from the top rank to rank 0 (float64)."""
RECORDS_FLAG = 1
"""``flag`` of the ``Kind.STATE`` message in which the top rank sends rank 0 its training records."""


class TrainingLog:
    """The top rank's ``kind="train"`` records: loss and accuracy over the last ``log_every`` steps.

    The trainer's window: mean training loss and accuracy since the previous record, training examples per
    second over the same window, ``wall_time`` in seconds since the run started. The top rank writes them to
    its own file (``metrics.rank<K-1>.jsonl``, kept if the job dies) and sends them to rank 0 after each epoch
    (:meth:`take_unsent`), which writes them into ``metrics.jsonl`` beside its eval records.
    """

    def __init__(
        self, writer: MetricsWriter, config: DNIConfig, *, steps_per_epoch: int, transport: Transport,
        started: float,
    ) -> None:  # fmt: skip
        self.writer, self.config, self.transport = writer, config, transport
        self.steps_per_epoch, self.started = steps_per_epoch, started
        self.loss_sum, self.correct, self.samples = 0.0, 0, 0
        self.since = time.perf_counter()
        self.unsent: list[list[float]] = []

    def add(self, t: int, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count step ``t`` (its batch-mean ``loss``, ``logits`` and labels ``y``); write a record if due."""
        self.loss_sum += loss * len(y)
        self.correct += int((logits.argmax(dim=1) == y).sum())
        self.samples += len(y)
        if (t + 1) % self.config.log_every:
            return
        now = time.perf_counter()
        elapsed = now - self.since
        record = _train_record(
            self.config, self.steps_per_epoch, step=t + 1, wall_time=now - self.started,
            loss=self.loss_sum / self.samples, accuracy=self.correct / self.samples,
            samples_per_s=self.samples / elapsed if elapsed > 0 else None,
            bytes_sent=self.transport.bytes_sent,
        )  # fmt: skip
        self.writer.write(record)
        numbers = [getattr(record, name) for name in TRAIN_RECORD_FIELDS]
        self.unsent.append([math.nan if v is None else float(v) for v in numbers])
        self.loss_sum, self.correct, self.samples = 0.0, 0, 0
        self.since = time.perf_counter()

    def take_unsent(self) -> torch.Tensor:
        """The records since the last call, ``len(TRAIN_RECORD_FIELDS)`` float64 numbers each, flattened."""
        numbers = torch.tensor(self.unsent, dtype=torch.float64).reshape(-1)
        self.unsent = []
        return numbers


def _train_record(
    config: DNIConfig, steps_per_epoch: int, *, step: int, wall_time: float, loss: float, accuracy: float,
    samples_per_s: float | None, bytes_sent: int,
) -> MetricRecord:  # fmt: skip
    return MetricRecord(
        kind="train", step=step, epoch=step / steps_per_epoch, wall_time=wall_time, loss=loss,
        accuracy=accuracy, samples_per_s=samples_per_s, lr=config.lr, bytes_sent=bytes_sent,
        extra={"stage": config.stages - 1},
    )  # fmt: skip


def train_records_of(numbers: torch.Tensor, config: DNIConfig, steps_per_epoch: int) -> list[MetricRecord]:
    """Rank 0: the top rank's records back from the numbers of :meth:`TrainingLog.take_unsent`."""
    records = []
    for row in numbers.view(-1, len(TRAIN_RECORD_FIELDS)).tolist():
        values = dict(zip(TRAIN_RECORD_FIELDS, row, strict=True))
        records.append(_train_record(
            config, steps_per_epoch, step=int(values["step"]), wall_time=values["wall_time"],
            loss=values["loss"], accuracy=values["accuracy"],
            samples_per_s=None if math.isnan(values["samples_per_s"]) else values["samples_per_s"],
            bytes_sent=int(values["bytes_sent"]),
        ))  # fmt: skip
    return records


def run_summary(
    config: DNIConfig,
    data: RunData,
    stage_stats: list[StageStats],
    evaluations: list[dict[str, Any]],
    *,
    steps: int,
    steps_per_epoch: int,
    rank0_seconds: float,
    stage_costs: list[int],
) -> dict[str, Any]:
    """The run's summary (rank 0): the last evaluation, throughput and each stage's counters."""
    samples = steps * config.batch_size
    # The job's pace is its slowest rank's: samples over the longest training wall time.
    wall = max(s.wall_s for s in stage_stats)
    top = stage_stats[-1]
    return {
        "config": asdict(config),
        "mode": config.mode + ("-cdni" if config.cdni and config.mode == "dni" else ""),
        "dataset": getattr(data.train, "name", config.dataset),
        "dataset_note": getattr(data.train, "note", None),
        "train_examples": len(data.train_labels),
        "test_examples": len(data.test_labels),
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "test_accuracy": evaluations[-1]["test_accuracy"],
        "test_loss": evaluations[-1]["test_loss"],
        "evaluations": evaluations,
        "train_loss": top.loss_sum / top.samples if top.samples else None,
        "samples_per_s": samples / wall if wall > 0 else None,
        "train_seconds": wall,
        "rank0_seconds": rank0_seconds,
        "stage_costs": stage_costs,
        "stages": [
            {
                **asdict(s),
                "utilisation": s.utilisation,
                "mean_delay": s.delay_sum / s.sg_updates if s.sg_updates else None,
                "mean_sg_loss": s.sg_loss_sum / s.sg_updates if s.sg_updates else None,
            }
            for s in stage_stats
        ],  # fmt: skip
    }
