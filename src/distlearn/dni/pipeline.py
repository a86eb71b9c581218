"""Decoupled neural interfaces across processes: one stage per rank, activations up, gradients down.

Rank ``k`` of a ``K``-process job holds stage ``k`` of the network (and, below the top, the
synthetic-gradient model ``M_k`` of its output). Every rank computes the same seeded batch order, so
only activations and gradients travel (c10d point-to-point, :mod:`distlearn.comm.p2p` headers); rank 0
reads the images, every rank reads the labels.

This module is the run of one rank: what it shares with the trainer -- the data
(:func:`distlearn.data.prepare.prepare_data`: the same seeded subset, test examples and transform), the batch
order (:func:`distlearn.parallel.base.epoch_batches` of one replica, through :func:`batch_indices`), the
test-set evaluation (:func:`distlearn.evaluation.evaluate`) and the metrics records (``kind="train"`` on the
top rank, ``"eval"`` and ``"summary"`` on rank 0) -- and the epochs around the stage's steps. The stage's
step, messages and counters are :class:`~distlearn.dni.worker.StageWorker`'s.

``mode="dni"`` (update unlocking, Jaderberg et al. 2016), step ``t`` on rank ``k``::

    h_{k-1}^t  <- receive from k-1                     (rank 0: the batch)
    h_k^t       = f_k(h_{k-1}^t)
    theta_k    <- step on  M_k(h_k^t, y^t)^T dh_k/dtheta_k / B      (top rank: the true loss gradient)
    send h_k^t up to k+1 (isend)  and  delta_{k-1}^t = B * dL_hat/dh_{k-1}^t down to k-1 (isend)
    for every delta_k^s (s <= t) that has arrived from k+1:  fit M_k on (h_k^s, y^s) -> delta_k^s

No rank waits for the backward pass of the ranks above: the gradient of step ``s`` is used to train
``M_k`` whenever it arrives (its *delay*, ``t - s`` steps, is recorded). Flow control bounds how far a
rank may run ahead: at most ``max_lag`` of its activations may be unanswered (then it waits for the oldest
gradient) -- a rank only waits when the rank above is the slower one, which bounds memory, not speed.

``mode="backprop"`` (plain model-parallel backprop on the same ranks, the reference): rank ``k`` sends
``h_k^t`` up and *waits* for the true ``dL/dh_k^t`` before its backward pass and update; the stages take
turns, one at a time. Its updates equal one process's backprop (tests/dni checks to 1e-5).

Every wait has a deadline (``timeout_s``): a dead or stuck neighbour raises
:class:`~distlearn.errors.CommError` naming both ranks and the message, the process exits with an error,
and the launcher ends the job. After each epoch every rank sends its stage's weights and counters to rank 0
(``Kind.STATE``), which evaluates the composed network on the test set and writes the metrics; the ranks
start the next epoch when rank 0 says so (``Kind.ACK``), so evaluation stays out of the timings.

Stage utilisation = time computing (forward, backward, updates, synthetic-gradient fits) / wall time of
the rank's training steps; the rest is waiting for inputs, gradients or the send window.

Where we differ from the paper: the paper's "asynchronous" experiments (section 3.2) update layers at random
times in one process; here the asynchrony is real (processes at their own pace), so a gradient's delay is
whatever the machine makes it. Not supported: checkpoints and resume, gradient clipping, LR schedules.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.comm.p2p import Header, Kind, Transport
from distlearn.data.prepare import RunData, prepare_data
from distlearn.dni.config import DNIConfig
from distlearn.dni.report import RECORDS_FLAG, TRAIN_RECORD_FIELDS, TrainingLog, run_summary, train_records_of
from distlearn.dni.stages import build_model, split_model
from distlearn.dni.synthetic import SyntheticGradient
from distlearn.dni.worker import (
    ACTIVATION_TAG,
    GRADIENT_TAG,
    STATE_TAG,
    STATS_FIELDS,
    StageStats,
    StageWorker,
    load_state_vector,
    state_vector,
)
from distlearn.errors import CommError, ConfigError
from distlearn.evaluation import evaluate
from distlearn.metrics import MetricRecord, MetricsWriter
from distlearn.parallel.base import epoch_batches

__all__ = [
    "ACTIVATION_TAG",
    "GRADIENT_TAG",
    "STATE_TAG",
    "DNIConfig",
    "StageStats",
    "StageWorker",
    "batch_indices",
    "run_pipeline",
]


# -- the whole run of one rank -------------------------------------------------------------------------------


def batch_indices(
    step: int,
    n: int,
    *,
    batch: int,
    seed: int,
    cache: dict[tuple[int, int], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Indices of global step ``step``: the trainer's batch ``step mod S`` of epoch ``step // S``.

    The batches are :func:`distlearn.parallel.base.epoch_batches` of one replica (``S = n // batch`` full
    batches of the seeded permutation of epoch ``e``), so every rank agrees on the batch without talking and
    a DNI run sees the trainer's batches in the trainer's order; ``cache`` keeps the current epoch's batches.
    """
    steps_per_epoch = n // batch
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {batch} exceeds the {n} training examples; lower it")
    epoch, position = divmod(step, steps_per_epoch)
    key = (epoch, n)
    batches = cache.get(key) if cache is not None else None
    if batches is None:
        batches = list(epoch_batches(n, global_batch=batch, seed=seed, epoch=epoch))
        if cache is not None:
            cache.clear()
            cache[key] = batches
    return batches[position]


def _say(message: str) -> None:
    print(f"[distlearn dni] {message}", file=sys.stderr, flush=True)


@dataclass
class _Network:
    """The whole network (every rank builds it from the seed; rank 0 assembles the trained one in it)."""

    model: nn.Module
    pieces: list[nn.Module]
    """``pieces[k]``: stage ``k`` (a part of ``model``, sharing its parameters)."""
    shapes: list[tuple[int, ...]]
    """``shapes[k]``: the per-example input of stage ``k``; ``shapes[k + 1]``: its output."""

    @property
    def stage_costs(self) -> list[int]:
        """Parameters of each stage."""
        return [sum(p.numel() for p in piece.parameters()) for piece in self.pieces]


def _build_network(config: DNIConfig, data: RunData) -> _Network:
    torch.manual_seed(config.seed)
    channels, height, _ = data.image_shape
    model = build_model(
        config.model, stages=config.stages, in_channels=channels, num_classes=data.num_classes,
        image_size=height, batch_norm=config.batch_norm,
    )  # fmt: skip
    example = data.transform(data.train_images[:2])
    pieces = split_model(model, config.stages, example)
    shapes, h = [tuple(example.shape[1:])], example
    model.eval()  # measuring shapes must not move batch-norm statistics
    with torch.no_grad():
        for piece in pieces:
            h = piece(h)
            shapes.append(tuple(h.shape[1:]))
    model.train()
    return _Network(model, pieces, shapes)


def _build_worker(
    config: DNIConfig, network: _Network, data: RunData, *, rank: int, world_size: int, transport: Transport
) -> StageWorker:
    """Stage ``rank`` with its optimizer and (dni, below the top) ``M_k``, seeded per rank."""
    stage = network.pieces[rank]
    torch.manual_seed(config.seed * 1_000_003 + 7 + rank)  # this rank's M_k initialisation
    gradient_model = sg_optimizer = None
    if config.mode == "dni" and rank < world_size - 1:
        gradient_model = SyntheticGradient(
            network.shapes[rank + 1],
            num_classes=data.num_classes if config.cdni else None,
            hidden=config.sg_widths,
        )
        sg_optimizer = torch.optim.Adam(gradient_model.parameters(), lr=config.sg_lr)
    optimizer = torch.optim.Adam(stage.parameters(), lr=config.lr)
    return StageWorker(
        stage, rank=rank, stages=world_size, mode=config.mode, input_shape=network.shapes[rank],
        output_shape=network.shapes[rank + 1], batch=config.batch_size, optimizer=optimizer,
        gradient_model=gradient_model, sg_optimizer=sg_optimizer, transport=transport,
        max_lag=config.max_lag, record_messages=config.record_messages,
    )  # fmt: skip


def _gather_states(
    network: _Network, transport: Transport, world_size: int
) -> tuple[list[StageStats], torch.Tensor]:
    """Rank 0: every other stage's weights (into ``network``) and counters, in rank order (rank 0 omitted),
    and the top rank's training records since the previous epoch (``TrainingLog.take_unsent``)."""
    stats = []
    what = "receiving the end-of-epoch state"
    for peer in range(1, world_size):
        length = state_vector(network.pieces[peer]).numel()
        vector = torch.empty(length + len(STATS_FIELDS))
        header = transport.recv_header(peer, tag=STATE_TAG, what=what)
        if header.kind != Kind.STATE or header.length != vector.numel():
            raise CommError(f"rank 0: rank {peer} sent {header.kind.name} of {header.length} numbers")
        transport.recv_payload(peer, vector, tag=STATE_TAG, what=what)
        load_state_vector(network.pieces[peer], vector[:length])
        stats.append(StageStats.from_tensor(vector[length:]))
    top = world_size - 1
    header = transport.recv_header(top, tag=STATE_TAG, what="receiving the training records")
    if header.kind != Kind.STATE or header.flag != RECORDS_FLAG or header.length % len(TRAIN_RECORD_FIELDS):
        raise CommError(f"rank 0: expected the training records of rank {top}, got {header}")
    records = torch.empty(header.length, dtype=torch.float64)
    transport.recv_payload(top, records, tag=STATE_TAG, what="receiving the training records")
    return stats, records


def _send_state(
    worker: StageWorker, transport: Transport, *, rank: int, step: int, records: torch.Tensor | None
) -> None:
    """Ranks above 0: send the stage's weights and counters (the top rank: then its training records), then
    wait for rank 0's go-ahead."""
    payload = torch.cat([state_vector(worker.stage), worker.stats.to_tensor()])
    transport.send(
        0, Header(Kind.STATE, version=worker.version, step=step, length=payload.numel(), sender=rank),
        payload, tag=STATE_TAG,
    )  # fmt: skip
    if records is not None:
        header = Header(Kind.STATE, step=step, length=records.numel(), flag=RECORDS_FLAG, sender=rank)
        transport.send(0, header, records, tag=STATE_TAG)
    # Rank 0 evaluates meanwhile; waiting for its go-ahead is outside the timings.
    header = transport.recv_header(0, tag=STATE_TAG, what="waiting for rank 0's go-ahead")
    if header.kind != Kind.ACK or header.step != step:
        raise CommError(f"rank {rank}: expected rank 0's go-ahead for step {step}, got {header}")


def run_pipeline(config: DNIConfig, *, rank: int, world_size: int, group: Any = None) -> dict[str, Any]:
    """The whole life of rank ``rank`` in a model-parallel job (the process group must exist).

    Returns the run's summary on rank 0 (test accuracy, throughput, per-stage utilisation), ``{}`` elsewhere.
    """
    config.validate()
    if world_size != config.stages:
        raise ConfigError(
            f"--stages {config.stages} needs exactly {config.stages} processes (one per stage), "
            f"but the job has {world_size}; start it with --workers {config.stages}"
        )
    torch.set_num_threads(config.threads)
    # The trainer's data: the same seeded subset, test examples and transform (augmentation is not supported).
    data = prepare_data(
        config.dataset, data_root=config.data_root, train_samples=config.train_samples,
        test_samples=config.test_samples, seed=config.seed, augment=False,
    )  # fmt: skip
    images, labels, transform = data.train_images, data.train_labels, data.transform
    batch = config.batch_size
    steps_per_epoch = len(labels) // batch
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {batch} exceeds the {len(labels)} training examples; lower it")
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch

    # Every rank builds the same whole model from the seed, then keeps its own stage.
    network = _build_network(config, data)
    transport = Transport(rank, timeout_s=config.timeout_s, group=group)
    worker = _build_worker(config, network, data, rank=rank, world_size=world_size, transport=transport)
    out = Path(config.out)
    # Rank 0 writes eval and summary records and, after each epoch, the top rank's training records; the top
    # rank also writes its training records to its own file at once; the middle ranks write none.
    writer = MetricsWriter(out, rank=rank, world_size=world_size, role=f"stage{rank}", tensorboard="off")
    if 0 < rank < world_size - 1:
        writer.close()
        writer.path.unlink(missing_ok=True)
    orders: dict[tuple[int, int], list[torch.Tensor]] = {}

    def batch_of(t: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        indices = batch_indices(t, len(labels), batch=batch, seed=config.seed, cache=orders)
        return (transform(images[indices]) if rank == 0 else None), labels[indices]

    started = time.perf_counter()
    training_log = TrainingLog(
        writer, config, steps_per_epoch=steps_per_epoch, transport=transport, started=started
    )

    def on_step(t: int, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        training_log.add(t, loss, logits, y)
        if config.die_at_step is not None and t == config.die_at_step:
            _say(f"rank {rank}: dying at step {t} as asked (--die-at-step)")
            sys.stderr.flush()
            os._exit(17)

    worker.on_step = on_step
    evaluations: list[dict[str, Any]] = []
    stage_stats: list[StageStats] = []
    step = 0
    train_seconds = 0.0
    while step < total_steps:
        steps = min(steps_per_epoch, total_steps - step) if config.eval_every_epoch else total_steps
        epoch_started = time.perf_counter()
        worker.run(step, steps, batch_of)
        step += steps
        if rank != 0:
            records = training_log.take_unsent() if rank == world_size - 1 else None
            _send_state(worker, transport, rank=rank, step=step, records=records)
            continue
        # Rank 0 collects every stage (weights + counters), evaluates, then lets the others go on.
        train_seconds += time.perf_counter() - epoch_started
        peer_stats, records = _gather_states(network, transport, world_size)
        stage_stats = [StageStats(**asdict(worker.stats)), *peer_stats]
        for record in train_records_of(records, config, steps_per_epoch):
            writer.write(record)
        loss, accuracy = evaluate(network.model, data.test_images, data.test_labels, transform)
        evaluations.append({"step": step, "test_loss": loss, "test_accuracy": accuracy})
        writer.write(MetricRecord(
            kind="eval", step=step, epoch=step / steps_per_epoch, wall_time=time.perf_counter() - started,
            loss=loss, accuracy=accuracy, lr=config.lr, bytes_sent=transport.bytes_sent,
        ))  # fmt: skip
        for peer in range(1, world_size):
            transport.send(peer, Header(Kind.ACK, step=step, sender=0), tag=STATE_TAG)
    if config.record_messages:
        (out / f"messages.rank{rank}.json").write_text(json.dumps(worker.messages))
    summary: dict[str, Any] = {}
    if rank == 0:
        summary = run_summary(
            config, data, stage_stats, evaluations, steps=step, steps_per_epoch=steps_per_epoch,
            rank0_seconds=train_seconds, stage_costs=network.stage_costs,
        )  # fmt: skip
        writer.write(MetricRecord(
            kind="summary", step=step, epoch=step / steps_per_epoch, wall_time=time.perf_counter() - started,
            loss=summary["test_loss"], accuracy=summary["test_accuracy"],
            samples_per_s=summary["samples_per_s"], lr=config.lr, bytes_sent=transport.bytes_sent,
            extra=summary,
        ))  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.save_model:
            torch.save(network.model.state_dict(), out / "model.pt")
        if not config.quiet:
            utilisation = ", ".join(f"{100 * s.utilisation:.0f}%" for s in stage_stats)
            _say(
                f"{summary['mode']} {config.model} in {world_size} stages on {summary['dataset']}: "
                f"test accuracy {100 * summary['test_accuracy']:.2f}% after {step} steps, "
                f"{summary['samples_per_s']:.0f} samples/s, stage utilisation {utilisation}"
            )
    writer.close()
    return summary
