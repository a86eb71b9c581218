"""One stage of a model-parallel (DNI) job: its step, its messages and its counters.

:class:`StageWorker` is rank ``k``'s part of the pipeline described in :mod:`distlearn.dni.pipeline`: the
forward pass of stage ``k``, its update (on the synthetic gradient ``M_k(h_k, y) / B`` in ``mode="dni"``,
on the true gradient from rank ``k+1`` in ``mode="backprop"``), the activations it sends up and the
gradients it sends down (a :class:`~distlearn.comm.p2p.Header` plus a float32 payload each), the fits of
``M_k`` on the gradients that have arrived, and the send window. :class:`StageStats` holds its counters
(time computing and waiting, synthetic-gradient loss and delay, bytes), sent to rank 0 after each epoch
with the stage's weights (:func:`state_vector`).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distlearn.comm.p2p import Header, Kind, Transport
from distlearn.dni.local import fit_regression
from distlearn.errors import CommError, ConfigError

__all__ = [
    "ACTIVATION_TAG",
    "GRADIENT_TAG",
    "STATE_TAG",
    "STATS_FIELDS",
    "StageStats",
    "StageWorker",
    "load_state_vector",
    "state_vector",
]

ACTIVATION_TAG = 30
"""Channel of activations (stage k -> k+1); payloads on ``ACTIVATION_TAG + 1``."""
GRADIENT_TAG = 40
"""Channel of gradients (stage k -> k-1); payloads on ``GRADIENT_TAG + 1``."""
STATE_TAG = 50
"""Channel of end-of-epoch states (stage -> rank 0) and rank 0's go-ahead (``ACK``)."""

STATS_FIELDS = (
    "steps", "busy_s", "wall_s", "wait_input_s", "wait_gradient_s", "wait_send_s", "sg_loss_sum",
    "sg_updates", "delay_sum", "loss_sum", "correct", "samples", "bytes_sent", "bytes_received",
)  # fmt: skip
"""The counters of :class:`StageStats`, in the order they travel in a state message."""


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


def state_vector(stage: nn.Module) -> torch.Tensor:
    """The stage's parameters and buffers as one float32 vector (state_dict order).

    Buffers include batch normalisation's running statistics and its integer step count
    (``num_batches_tracked``, exact in float32 below 2**24 steps), so rank 0's assembled network -- what it
    evaluates and saves -- has every stage's statistics, not its own initial ones.
    """
    values = [v.detach().reshape(-1).float() for v in stage.state_dict().values()]
    return torch.cat(values) if values else torch.zeros(0)


def load_state_vector(stage: nn.Module, vector: torch.Tensor) -> None:
    """Copy ``vector`` (made by :func:`state_vector` of a stage of the same shape) into ``stage``."""
    offset = 0
    with torch.no_grad():
        for value in stage.state_dict().values():
            part = vector[offset : offset + value.numel()].view_as(value)
            value.copy_(part if value.is_floating_point() else part.round())
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
