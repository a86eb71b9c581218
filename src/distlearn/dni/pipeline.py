"""Decoupled neural interfaces across processes: one stage per rank, activations up, gradients down.

Rank ``k`` of a ``K``-process job holds stage ``k`` of the network (and, below the top, the
synthetic-gradient model ``M_k`` of its output). Every rank computes the same seeded batch order, so
only activations and gradients travel (c10d point-to-point, :mod:`distlearn.comm.p2p` headers); rank 0
reads the images, every rank reads the labels.

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

import collections
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from distlearn.comm.p2p import Header, Kind, Transport
from distlearn.dni.local import fit_regression
from distlearn.dni.stages import build_model, split_model
from distlearn.dni.synthetic import SyntheticGradient
from distlearn.errors import CommError, ConfigError
from distlearn.metrics import MetricRecord, MetricsWriter
from distlearn.models.transforms import BatchTransform

__all__ = [
    "ACTIVATION_TAG",
    "GRADIENT_TAG",
    "STATE_TAG",
    "DNIConfig",
    "StageStats",
    "StageWorker",
    "run_pipeline",
]

ACTIVATION_TAG = 30
"""Channel of activations (stage k -> k+1); payloads on ``ACTIVATION_TAG + 1``."""
GRADIENT_TAG = 40
"""Channel of gradients (stage k -> k-1); payloads on ``GRADIENT_TAG + 1``."""
STATE_TAG = 50
"""Channel of end-of-epoch states (stage -> rank 0) and rank 0's go-ahead (``ACK``)."""


@dataclass
class DNIConfig:
    """One model-parallel run. Each field is a flag of ``python -m distlearn.dni.cli``."""

    dataset: Literal["mnist", "fashion-mnist", "cifar10"] = field(
        default="mnist", metadata={"help": "dataset (mnist: the seeded 8,000/2,000 split of its test set)"}
    )
    model: Literal["mlp", "lenet", "resnet8"] = field(
        default="mlp",
        metadata={"help": "mlp: the paper's FCN, one hidden layer of 256 per stage; lenet: CNN"},
    )
    stages: int = field(default=3, metadata={"help": "K, stages of the model = processes of the job"})
    mode: Literal["dni", "backprop"] = field(
        default="dni", metadata={"help": "dni: synthetic gradients; backprop: model-parallel backprop"}
    )
    cdni: bool = field(default=False, metadata={"help": "condition synthetic gradients on the label (cDNI)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training set"})
    steps: int | None = field(
        default=None, metadata={"help": "stop after this many steps (overrides epochs)"}
    )
    batch_size: int = field(default=256, metadata={"help": "examples per step (the paper: 256)"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the stages"})
    sg_lr: float = field(
        default=1e-3, metadata={"help": "Adam learning rate of the synthetic-gradient models"}
    )
    sg_hidden: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "hidden widths of each synthetic-gradient model (default: linear; paper: 1024 1024)"
        },
    )
    max_lag: int = field(default=1, metadata={"help": "dni: unanswered activations before a rank waits"})
    timeout_s: float = field(default=60.0, metadata={"help": "deadline of every wait for a peer, seconds"})
    seed: int = field(default=0, metadata={"help": "weights, batch order"})
    train_samples: int | None = field(default=None, metadata={"help": "seeded subset of the training set"})
    test_samples: int | None = field(default=None, metadata={"help": "first N test examples only"})
    data_root: str | None = field(default=None, metadata={"help": "dataset directory"})
    out: str = field(default="runs/dni", metadata={"help": "run directory (metrics, messages)"})
    log_every: int = field(default=50, metadata={"help": "top rank: a training record every N steps"})
    eval_every_epoch: bool = field(
        default=True, metadata={"help": "evaluate after every epoch (else at end)"}
    )
    record_messages: bool = field(
        default=False, metadata={"help": "write every received header to OUT/messages.rank<k>.json"}
    )
    save_model: bool = field(
        default=False, metadata={"help": "rank 0 writes the trained network to OUT/model.pt"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads per rank"})
    die_at_step: int | None = field(
        default=None, metadata={"help": "testing: the top rank exits abruptly at this step"}
    )
    quiet: bool = field(default=False, metadata={"help": "do not print the summary"})

    def validate(self) -> None:
        if self.stages < 2:
            raise ConfigError(f"model parallelism needs --stages >= 2, got {self.stages}")
        for name in ("epochs", "batch_size", "max_lag", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.sg_lr <= 0 or self.timeout_s <= 0:
            raise ConfigError("--lr, --sg-lr and --timeout-s must be positive")

    @property
    def sg_widths(self) -> tuple[int, ...]:
        """``sg_hidden`` without zeros (``--sg-hidden 0`` is the linear model, like the default ``()``)."""
        return tuple(w for w in self.sg_hidden if w > 0)


STATS_FIELDS = (
    "steps", "busy_s", "wall_s", "wait_input_s", "wait_gradient_s", "wait_send_s", "sg_loss_sum",
    "sg_updates", "delay_sum", "loss_sum", "correct", "samples", "bytes_sent", "bytes_received",
)  # fmt: skip


@dataclass
class StageStats:
    """Counters of one rank (cumulative over the run); sent to rank 0 with the state."""

    steps: float = 0.0
    busy_s: float = 0.0
    wall_s: float = 0.0
    wait_input_s: float = 0.0
    wait_gradient_s: float = 0.0
    wait_send_s: float = 0.0
    sg_loss_sum: float = 0.0
    sg_updates: float = 0.0
    delay_sum: float = 0.0
    loss_sum: float = 0.0
    correct: float = 0.0
    samples: float = 0.0
    bytes_sent: float = 0.0
    bytes_received: float = 0.0

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, name) for name in STATS_FIELDS], dtype=torch.float32)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> StageStats:
        return cls(**{name: float(v) for name, v in zip(STATS_FIELDS, values.tolist(), strict=True)})

    @property
    def utilisation(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s > 0 else math.nan


def _state_vector(stage: nn.Module) -> torch.Tensor:
    """The stage's floating-point parameters and buffers as one float32 vector (state_dict order)."""
    values = [v.detach().reshape(-1).float() for v in stage.state_dict().values() if v.is_floating_point()]
    return torch.cat(values) if values else torch.zeros(0)


def _load_state_vector(stage: nn.Module, vector: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for value in stage.state_dict().values():
            if value.is_floating_point():
                value.copy_(vector[offset : offset + value.numel()].view_as(value))
                offset += value.numel()


class _Pending:
    """A posted receive of one header + payload message (posted early: gloo delivers to posted receives)."""

    def __init__(
        self, transport: Transport, peer: int, tag: int, step: int, shape: tuple[int, ...], what: str
    ):
        self.step, self.peer, self.what = step, peer, what
        self.header = torch.empty(8, dtype=torch.float64)
        self.payload = torch.empty(shape, dtype=torch.float32)
        self.header_handle = transport.post_recv(peer, self.header, tag=tag, what=f"{what} header")
        self.payload_handle = transport.post_recv(peer, self.payload, tag=tag + 1, what=what)

    def ready(self) -> bool:
        return bool(self.header_handle[0].is_completed() and self.payload_handle[0].is_completed())

    def complete(self, transport: Transport, kind: Kind) -> tuple[Header, torch.Tensor]:
        transport.complete(self.header_handle, self.header)
        transport.complete(self.payload_handle, self.payload)
        header = Header.from_tensor(self.header)
        if header.kind != kind or header.step != self.step or header.length != self.payload.numel():
            raise CommError(
                f"rank {transport.rank}: expected {kind.name} of step {self.step} with "
                f"{self.payload.numel()} numbers from rank {self.peer}, got {header.kind.name} of step "
                f"{header.step} with {header.length}: the ranks disagree on the schedule (different configs?)"
            )
        return header, self.payload


class StageWorker:
    """Stage ``k`` of ``K`` on this rank: its forward/backward, updates, messages and counters.

    Args:
        stage: the module of this stage.
        rank, stages: ``k`` and ``K``.
        mode: ``"dni"`` or ``"backprop"``.
        input_shape, output_shape: per-example shapes of the stage's input and output.
        batch: examples per step ``B``.
        optimizer: the stage's optimizer.
        gradient_model, sg_optimizer: ``M_k`` and its optimizer (dni, ranks below the top).
        transport: the p2p transport (deadlines, byte counts).
        max_lag: dni flow control (see the module docstring).
        record_messages: keep every received header in :attr:`messages`.
    """

    def __init__(
        self,
        stage: nn.Module,
        *,
        rank: int,
        stages: int,
        mode: str,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        batch: int,
        optimizer: torch.optim.Optimizer,
        gradient_model: nn.Module | None,
        sg_optimizer: torch.optim.Optimizer | None,
        transport: Transport,
        max_lag: int = 1,
        record_messages: bool = False,
    ) -> None:
        if mode not in ("dni", "backprop"):
            raise ConfigError(f"mode must be 'dni' or 'backprop', got {mode!r}")
        self.stage, self.rank, self.stages, self.mode = stage, rank, stages, mode
        self.is_top = rank == stages - 1
        if mode == "dni" and not self.is_top and (gradient_model is None or sg_optimizer is None):
            raise ConfigError("a dni stage below the top needs a synthetic-gradient model and its optimizer")
        self.input_shape, self.output_shape, self.batch = input_shape, output_shape, batch
        self.optimizer, self.gradient_model, self.sg_optimizer = optimizer, gradient_model, sg_optimizer
        self.transport, self.max_lag = transport, max_lag
        self.version = 0  # updates of this stage so far
        self.stats = StageStats()
        self.messages: list[dict[str, Any]] = []
        self.record_messages = record_messages
        self._sends: collections.deque[tuple[list[Any], Any]] = collections.deque()
        self._gradients: collections.deque[_Pending] = collections.deque()  # posted, oldest first
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (h_k, y) awaiting delta
        self._next_input: _Pending | None = None
        self.on_step: Any = None  # called with (step, loss, logits, y) on the top rank

    # -- messages ---------------------------------------------------------------------------------------
    def _log(self, header: Header, shape: tuple[int, ...], arrived_at: int) -> None:
        if self.record_messages:
            self.messages.append(
                {"kind": header.kind.name, "step": header.step, "version": header.version,
                 "sender": header.sender, "shape": list(shape), "received_at_step": arrived_at}
            )  # fmt: skip

    def _send(self, peer: int, kind: Kind, step: int, tensor: torch.Tensor, tag: int) -> None:
        payload = tensor.detach().contiguous().view(-1)
        header = Header(kind, version=self.version, step=step, length=payload.numel(), sender=self.rank)
        self._sends.append((self.transport.isend(peer, header, payload, tag=tag), payload))
        while len(self._sends) > 2 * self.max_lag:  # the send window: the oldest must have been delivered
            started = time.perf_counter()
            self.transport.finish(self._sends.popleft()[0])
            self.stats.wait_send_s += time.perf_counter() - started

    def _post_input(self, step: int) -> None:
        self._next_input = _Pending(
            self.transport, self.rank - 1, ACTIVATION_TAG, step, (self.batch, *self.input_shape),
            f"receiving the activation of step {step}",
        )  # fmt: skip

    def _receive_input(self, step: int) -> torch.Tensor:
        assert self._next_input is not None and self._next_input.step == step
        started = time.perf_counter()
        header, payload = self._next_input.complete(self.transport, Kind.ACTIVATION)
        self.stats.wait_input_s += time.perf_counter() - started
        self._log(header, tuple(payload.shape[1:]), step)
        return payload

    def _post_gradient(self, step: int) -> None:
        self._gradients.append(
            _Pending(self.transport, self.rank + 1, GRADIENT_TAG, step, (self.batch, *self.output_shape),
                     f"receiving the gradient of step {step}")
        )  # fmt: skip

    def _take_gradient(self, block: bool) -> tuple[int, torch.Tensor] | None:
        """The oldest posted gradient if it has arrived (or, with ``block``, once it arrives)."""
        if not self._gradients or not (block or self._gradients[0].ready()):
            return None
        pending = self._gradients.popleft()
        started = time.perf_counter()
        header, payload = pending.complete(self.transport, Kind.GRADIENT)
        self.stats.wait_gradient_s += time.perf_counter() - started
        self._log(header, tuple(payload.shape[1:]), self.version)
        return pending.step, payload

    def _fit_synthetic(self, block: bool) -> None:
        """Fit ``M_k`` on every gradient that has arrived, oldest first (``block``: wait for one at least)."""
        while True:
            arrived = self._take_gradient(block)
            if arrived is None:
                return
            block = False
            step, delta = arrived
            h, y = self._outputs.pop(step)
            assert self.gradient_model is not None and self.sg_optimizer is not None
            # delta is dL/dh_k of the batch-mean loss; M_k predicts B * dL/dh_k (see synthetic.py).
            error = fit_regression(self.gradient_model, self.sg_optimizer, (h, y), delta * self.batch)
            self.stats.sg_loss_sum += error
            self.stats.sg_updates += 1
            self.stats.delay_sum += self.version - 1 - step  # own updates since h_k^step was computed

    # -- the step ---------------------------------------------------------------------------------------
    def run(self, first_step: int, steps: int, batch_of: Any) -> None:
        """Run steps ``first_step .. first_step + steps - 1``; ``batch_of(t) -> (x or None, y)``."""
        started = time.perf_counter()
        last = first_step + steps - 1
        if self.rank > 0:
            self._post_input(first_step)
        for t in range(first_step, last + 1):
            x, y = batch_of(t)
            inp = x if self.rank == 0 else self._receive_input(t)
            if self.rank > 0 and t < last:
                self._post_input(t + 1)  # before computing: the stage below may deliver while we work
            self._step(t, inp, y)
            self.stats.steps += 1
        # Drain: every gradient of this epoch arrives and fits M_k; every send is delivered.
        if self.mode == "dni" and not self.is_top:
            while self._gradients:
                self._fit_synthetic(block=True)
        started_sends = time.perf_counter()
        while self._sends:
            self.transport.finish(self._sends.popleft()[0])
        self.stats.wait_send_s += time.perf_counter() - started_sends
        self.stats.wall_s += time.perf_counter() - started
        waited = self.stats.wait_input_s + self.stats.wait_gradient_s + self.stats.wait_send_s
        self.stats.busy_s = self.stats.wall_s - waited  # computing: everything that is not waiting
        self.stats.bytes_sent = float(self.transport.bytes_sent)
        self.stats.bytes_received = float(self.transport.bytes_received)

    def _step(self, t: int, inp: torch.Tensor, y: torch.Tensor) -> None:
        inp = inp.detach().requires_grad_(self.rank > 0)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.stage(inp)
        if not self.is_top:  # up at once: the stage above can start while this one does its backward
            if self.mode == "dni":
                self._outputs[t] = (out.detach(), y)
            self._post_gradient(t)
            self._send(self.rank + 1, Kind.ACTIVATION, t, out, ACTIVATION_TAG)
        if self.is_top:
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            self.stats.loss_sum += float(loss.detach()) * len(y)
            self.stats.correct += float((out.detach().argmax(dim=1) == y).sum())
            self.stats.samples += len(y)
            if self.on_step is not None:
                self.on_step(t, float(loss.detach()), out.detach(), y)
        elif self.mode == "dni":
            assert self.gradient_model is not None
            with torch.no_grad():
                synthetic = self.gradient_model(out.detach(), y) / self.batch
            out.backward(synthetic)
        else:  # backprop: wait for the true gradient from above
            arrived = self._take_gradient(block=True)
            assert arrived is not None and arrived[0] == t
            out.backward(arrived[1].view_as(out))
        self.optimizer.step()
        self.version += 1
        if self.rank > 0:
            assert inp.grad is not None
            self._send(self.rank - 1, Kind.GRADIENT, t, inp.grad, GRADIENT_TAG)
        if self.mode == "dni" and not self.is_top:
            self._fit_synthetic(block=len(self._outputs) > self.max_lag)


# -- the whole run of one rank -------------------------------------------------------------------------------


def batch_indices(
    step: int, n: int, *, batch: int, seed: int, cache: dict[tuple[int, int], torch.Tensor] | None = None
) -> torch.Tensor:
    """Indices of global step ``step``: epoch ``e``'s seeded permutation of ``n``, cut into full batches.

    The same rule as the trainer's (:func:`distlearn.parallel.base.epoch_batches`), so every rank agrees
    on the batch without talking; ``cache`` keeps the current epoch's permutation.
    """
    epoch, position = divmod(step, n // batch)
    key = (epoch, n)
    order = cache.get(key) if cache is not None else None
    if order is None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        if cache is not None:
            cache.clear()
            cache[key] = order
    return order[position * batch : (position + 1) * batch]


def _load(config: DNIConfig) -> tuple[Any, Any]:
    from distlearn.data import load_dataset

    return (
        load_dataset(config.dataset, "train", root=config.data_root),
        load_dataset(config.dataset, "test", root=config.data_root),
    )


def _say(message: str) -> None:
    print(f"[distlearn dni] {message}", file=sys.stderr, flush=True)


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
    train_set, test_set = _load(config)
    images, labels = train_set.images, train_set.labels
    if config.train_samples is not None and config.train_samples < len(labels):
        subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))
        subset = subset[: config.train_samples].sort().values
        images, labels = images[subset], labels[subset]
    test_images, test_labels = test_set.images, test_set.labels
    if config.test_samples is not None:
        test_images, test_labels = test_images[: config.test_samples], test_labels[: config.test_samples]
    transform = BatchTransform(train_set.mean, train_set.std)
    _, channels, height, _ = images.shape
    num_classes = len(train_set.classes)
    batch = config.batch_size
    steps_per_epoch = len(labels) // batch
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {batch} exceeds the {len(labels)} training examples; lower it")
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch

    # Every rank builds the same whole model from the seed, then keeps its own stage.
    torch.manual_seed(config.seed)
    model = build_model(
        config.model, stages=config.stages, in_channels=channels, num_classes=num_classes, image_size=height
    )
    example = transform(images[:2])
    pieces = split_model(model, config.stages, example)
    shapes, h = [tuple(example.shape[1:])], example
    with torch.no_grad():
        for piece in pieces:
            h = piece(h)
            shapes.append(tuple(h.shape[1:]))
    stage = pieces[rank]
    torch.manual_seed(config.seed * 1_000_003 + 7 + rank)  # this rank's M_k initialisation
    gradient_model = sg_optimizer = None
    if config.mode == "dni" and rank < world_size - 1:
        gradient_model = SyntheticGradient(
            shapes[rank + 1], num_classes=num_classes if config.cdni else None, hidden=config.sg_widths
        )
        sg_optimizer = torch.optim.Adam(gradient_model.parameters(), lr=config.sg_lr)
    transport = Transport(rank, timeout_s=config.timeout_s, group=group)
    optimizer = torch.optim.Adam(stage.parameters(), lr=config.lr)
    worker = StageWorker(
        stage, rank=rank, stages=world_size, mode=config.mode, input_shape=shapes[rank],
        output_shape=shapes[rank + 1], batch=batch, optimizer=optimizer,
        gradient_model=gradient_model, sg_optimizer=sg_optimizer, transport=transport,
        max_lag=config.max_lag, record_messages=config.record_messages,
    )  # fmt: skip
    out = Path(config.out)
    # Rank 0 writes eval and summary records, the top rank the training records; the middle ranks none.
    writer = MetricsWriter(out, rank=rank, world_size=world_size, role=f"stage{rank}", tensorboard="off")
    if 0 < rank < world_size - 1:
        writer.close()
        writer.path.unlink(missing_ok=True)
    orders: dict[tuple[int, int], torch.Tensor] = {}

    def batch_of(t: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        indices = batch_indices(t, len(labels), batch=batch, seed=config.seed, cache=orders)
        return (transform(images[indices]) if rank == 0 else None), labels[indices]

    window = {"loss": 0.0, "correct": 0, "n": 0, "since": time.perf_counter()}

    def on_step(t: int, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        window["loss"] += loss * len(y)
        window["correct"] += int((logits.argmax(dim=1) == y).sum())
        window["n"] += len(y)
        if config.die_at_step is not None and t == config.die_at_step:
            _say(f"rank {rank}: dying at step {t} as asked (--die-at-step)")
            sys.stderr.flush()
            import os

            os._exit(17)
        if (t + 1) % config.log_every == 0:
            elapsed = time.perf_counter() - window["since"]
            writer.write(MetricRecord(
                kind="train", step=t + 1, epoch=(t + 1) / steps_per_epoch, wall_time=elapsed,
                loss=window["loss"] / window["n"], accuracy=window["correct"] / window["n"],
                samples_per_s=window["n"] / elapsed if elapsed > 0 else None, lr=config.lr,
                bytes_sent=transport.bytes_sent,
            ))  # fmt: skip
            window.update(loss=0.0, correct=0, n=0, since=time.perf_counter())

    worker.on_step = on_step
    evaluations: list[dict[str, Any]] = []
    stage_stats: list[StageStats] = []
    step = 0
    train_seconds = 0.0
    started = time.perf_counter()
    model_lengths = [_state_vector(piece).numel() for piece in pieces]
    while step < total_steps:
        steps = min(steps_per_epoch, total_steps - step) if config.eval_every_epoch else total_steps
        epoch_started = time.perf_counter()
        worker.run(step, steps, batch_of)
        step += steps
        # Rank 0 collects every stage (weights + counters), evaluates, then lets the others go on.
        if rank == 0:
            train_seconds += time.perf_counter() - epoch_started
            stage_stats = [StageStats(**asdict(worker.stats))]
            for peer in range(1, world_size):
                vector = torch.empty(model_lengths[peer] + len(STATS_FIELDS))
                header = transport.recv_header(peer, tag=STATE_TAG, what="receiving the end-of-epoch state")
                if header.kind != Kind.STATE or header.length != vector.numel():
                    raise CommError(f"rank 0: rank {peer} sent {header.kind.name} of {header.length} numbers")
                transport.recv_payload(peer, vector, tag=STATE_TAG, what="receiving the end-of-epoch state")
                _load_state_vector(pieces[peer], vector[: model_lengths[peer]])
                stage_stats.append(StageStats.from_tensor(vector[model_lengths[peer] :]))
            loss, accuracy = _evaluate(model, test_images, test_labels, transform)
            evaluations.append({"step": step, "test_loss": loss, "test_accuracy": accuracy})
            writer.write(MetricRecord(
                kind="eval", step=step, epoch=step / steps_per_epoch, wall_time=time.perf_counter() - started,
                loss=loss, accuracy=accuracy, lr=config.lr, bytes_sent=transport.bytes_sent,
            ))  # fmt: skip
            for peer in range(1, world_size):
                transport.send(peer, Header(Kind.ACK, step=step, sender=0), tag=STATE_TAG)
        else:
            payload = torch.cat([_state_vector(stage), worker.stats.to_tensor()])
            transport.send(
                0, Header(Kind.STATE, version=worker.version, step=step, length=payload.numel(), sender=rank),
                payload, tag=STATE_TAG,
            )  # fmt: skip
            # Rank 0 evaluates meanwhile; waiting for its go-ahead is outside the timings.
            header = transport.recv_header(0, tag=STATE_TAG, what="waiting for rank 0's go-ahead")
            if header.kind != Kind.ACK or header.step != step:
                raise CommError(f"rank {rank}: expected rank 0's go-ahead for step {step}, got {header}")
    if config.record_messages:
        (out / f"messages.rank{rank}.json").write_text(json.dumps(worker.messages))
    summary: dict[str, Any] = {}
    if rank == 0:
        samples = step * batch
        # The job's pace is its slowest rank's: samples over the longest training wall time.
        wall = max(s.wall_s for s in stage_stats)
        top = stage_stats[-1]
        summary = {
            "config": asdict(config),
            "mode": config.mode + ("-cdni" if config.cdni and config.mode == "dni" else ""),
            "dataset": getattr(train_set, "name", config.dataset),
            "dataset_note": getattr(train_set, "note", None),
            "train_examples": len(labels),
            "test_examples": len(test_labels),
            "steps": step,
            "epochs": step / steps_per_epoch,
            "test_accuracy": evaluations[-1]["test_accuracy"],
            "test_loss": evaluations[-1]["test_loss"],
            "evaluations": evaluations,
            "train_loss": top.loss_sum / top.samples if top.samples else None,
            "samples_per_s": samples / wall if wall > 0 else None,
            "train_seconds": wall,
            "rank0_seconds": train_seconds,
            "stage_costs": [sum(p.numel() for p in piece.parameters()) for piece in pieces],
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
        writer.write(MetricRecord(
            kind="summary", step=step, epoch=step / steps_per_epoch, wall_time=time.perf_counter() - started,
            loss=summary["test_loss"], accuracy=summary["test_accuracy"],
            samples_per_s=summary["samples_per_s"], lr=config.lr, bytes_sent=transport.bytes_sent,
            extra=summary,
        ))  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.save_model:
            torch.save(model.state_dict(), out / "model.pt")
        if not config.quiet:
            utilisation = ", ".join(f"{100 * s.utilisation:.0f}%" for s in stage_stats)
            _say(
                f"{summary['mode']} {config.model} in {world_size} stages on {summary['dataset']}: "
                f"test accuracy {100 * summary['test_accuracy']:.2f}% after {step} steps, "
                f"{summary['samples_per_s']:.0f} samples/s, stage utilisation {utilisation}"
            )
    writer.close()
    return summary


def _evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform
) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            logits = model(transform(images[start : start + 1000]))
            y = labels[start : start + 1000]
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    return loss_sum / max(1, len(labels)), correct / max(1, len(labels))
