"""Asynchronous SGD with parameter servers (Downpour), staleness-aware rates, n-softsync, backup workers.

Downpour SGD (Dean et al., 2012, "Large scale distributed deep networks"): ranks ``0 .. S-1`` of the job are
*servers*, the other ``W = world_size - S`` ranks are *workers*. The servers hold the global parameters
``w``, split by parameter tensor (balanced by size: largest tensor first, each to the least-loaded server)
and run the optimizer on their shard. Worker ``i`` loops::

    pull w^(v_i) (the shard of every server, with its version v_i)
    g_i = grad of the loss on its own mini-batch at w^(v_i)
    push g_i tagged with v_i, and go on -- without waiting for the other workers

and a server at version ``v`` that receives ``g_i`` records its **staleness** ``tau_i = v - v_i`` (how many
updates happened since the gradient's weights were read) and applies ``w <- w - eta * u(g_i)``, where ``u``
is its optimizer's update (any distlearn.optim or torch.optim optimizer), ``v <- v + 1``.

Variants (one flag each, all on the same code path):

* **staleness-aware** (Zhang, Gupta, Lian & Liu, 2016, "Staleness-aware async-SGD"): each gradient is
  divided by its staleness, ``g <- g / max(1, tau)`` -- with SGD exactly ``eta / tau``. We use
  ``max(1, tau)`` because a gradient no update overtook has ``tau = 0`` here (Zhang et al. count from 1).
  With adaptive optimizers (Adam, RMSProp) the scaling is largely normalised away; use SGD/momentum.
* **n-softsync** (Gupta, Zhang & Wang, 2016, "Model accuracy and runtime tradeoff in distributed deep
  learning"): the server collects ``n`` gradients and applies their mean,
  ``w <- w - eta * u((1/n) sum_l g_l / s_l)`` (``s_l`` = staleness factor above, or 1). ``n = 1`` is plain
  async; ``n = R`` is synchronous SGD. *Where we differ:* a worker's pull is answered when the group its
  gradient belongs to has been applied (not with the weights current at the push), which is what makes
  ``n = R`` exactly synchronous SGD with the global batch (tests check it to 1e-5 against one process).
  Gradients are summed in worker order, so a group's result does not depend on arrival order.
* **backup workers** (Chen, Pan, Monga, Bengio & Jozefowicz, 2016, "Revisiting distributed synchronous
  SGD"): ``R + b`` workers, each on ``M = B / R`` examples; the server takes the step on the *first* ``R``
  gradients computed on its current version and drops (and counts) every gradient computed on an older
  version, answering it with the current weights. With several servers each shard picks its own first
  ``R`` (as TensorFlow's per-variable accumulators do).
* **k local steps** (the overview's "k local steps" view; Downpour's ``n_fetch = n_push = k``): a worker
  takes ``k`` steps with its own optimizer on its local copy, then pushes the accumulated gradient
  ``sum_{j<k} g_j`` and pulls. With SGD at the same rate on both sides the server's update equals the
  worker's local displacement.
* **compressed pushes** (``compression=NAME``, ``--compression``): each push goes through a codec of
  :mod:`distlearn.comm.compression` on the worker (with its error-feedback residual kept per server on the
  worker, so what a push leaves out is added to the next one) and is decoded on the server before the
  optimizer sees it; the bytes counted are the packed payload's. Codecs that need every rank at once
  cannot serve pushes that arrive one at a time: PowerSGD (allreduces of ``P`` and ``Q``), random-k (an
  index set shared by all ranks) and DGC (its momentum correction replaces the optimizer's momentum, which
  here lives on the server).

Transport: messages are a fixed header plus a payload over c10d point-to-point (:mod:`distlearn.comm.p2p`).
When a worker and a server share a machine (found out at the first pull: the server can map the shared-memory
blocks the worker created, :mod:`distlearn.comm.shm`), the payloads -- the pushed gradient and the weights
of the reply -- go through two blocks both processes map, and only the header travels over the backend:
one small message each way per push instead of a header and a payload each way through loopback TCP. The
server's optimizer reads a single pushed gradient in the block, and the worker's parameters are rebound to
views of its reply block at the first shared pull, so neither side copies the shard (a parameter that
something else rebound since is copied into instead). Compressed pushes still send their packed bytes
over the backend; ``shared_memory=False``
(``--no-ps-shared-memory``) sends everything over the backend, as between machines.

Fault handling: workers send heartbeats (a header without payload) every ``worker_timeout / 4`` seconds; a
server that hears nothing from a worker for ``worker_timeout`` seconds, or cannot answer it, logs it,
drops it from the live set (groups then close with the workers that are left) and continues. A worker
whose server died ends with a :class:`~distlearn.errors.CommError` naming the server and the operation.
The servers stop when every live worker has said it is done. Checkpoints: when the main worker (the first
worker rank) checkpoints, each server saves its shard, optimizer state, version and logs next to it
(``ps-server<rank>-step<N>.pt``); ``--resume`` brings them back and the version count continues.

Not synchronised: module buffers (BatchNorm running statistics) stay local to each worker, as in Downpour.
The server's parameters are 1-D views of one flat buffer (one message per server per push), which every
element-wise optimizer (all of distlearn.optim's first-order ones, torch's SGD/Adam/...) treats exactly as
the original shapes. Under one-machine ``torchrun`` the launcher ends the whole job when any process exits
with an error; a job that must survive a worker's death runs each process as its own node (``--nnodes``,
or plain processes with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``).

Tuning: staleness grows with the number of workers (about ``R - 1`` for round-robin arrival); lower the rate
or use staleness-aware updates when ``R`` is large; softsync ``n`` trades throughput (``n = 1``) for the
synchronous trajectory (``n = R``); ``b = 1`` or ``2`` backup workers cut the straggler tail; ``k`` > 1
divides the messages by ``k`` at the cost of larger, staler updates.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from distlearn import optim
from distlearn.comm.p2p import HEADER_SIZE, REPLY, REQUEST, Header, Kind, Transport
from distlearn.comm.shm import SharedBlock, new_token
from distlearn.config import parse_options, positive
from distlearn.errors import CheckpointError, CommError, ConfigError
from distlearn.launch import DistContext, shutdown
from distlearn.parallel.base import Strategy, StrategyStats, epoch_batches
from distlearn.parallel.sync import CompressionOptions

__all__ = ["PSOptions", "ParameterServer", "PushGate", "shard_parameters"]

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

_ERROR_LAYOUT = 1


def shard_parameters(sizes: list[int], servers: int) -> list[list[int]]:
    """Split tensors of ``sizes`` elements over ``servers``: largest first, each to the least-loaded server.

    Greedy LPT scheduling (Graham, 1969): the heaviest load is at most 4/3 of the optimum. Ties go to the
    lower tensor index and the lower server. Returns each server's tensor indices in increasing order.
    """
    if servers < 1:
        raise ConfigError(f"need at least one server, got {servers}")
    loads = [0] * servers
    assigned: list[list[int]] = [[] for _ in range(servers)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(servers), key=lambda s: (loads[s], s))
        assigned[target].append(index)
        loads[target] += sizes[index]
    return [sorted(indices) for indices in assigned]


class PushGate(Protocol):
    """Hooks around each push of a worker (deterministic schedules in tests and experiments)."""

    def before_push(self, worker: int, push: int) -> None: ...

    def after_pull(self, worker: int, push: int) -> None: ...


def _log(message: str) -> None:
    print(f"[distlearn ps] {message}", file=sys.stderr, flush=True)


_PUSH_COMPRESSED = 1  # header flag of a push whose payload is a codec's packed bytes
_PUSH_SHARED = 2  # header flag of a push whose gradient lies in the worker's shared push block
_DROPPED = 1  # PARAMS flag bits: the push was dropped as late (backup workers),
_VIA_SHARED = 2  # the weights lie in the worker's shared reply block (no payload follows),
_SHARED_ACCEPTED = 4  # the server mapped the worker's shared blocks (answer to INIT)


def make_push_codec(name: str, options: dict[str, Any]) -> Any:
    """The codec ``name`` for parameter-server pushes; ConfigError if it cannot serve them (and why)."""
    from distlearn.comm.compression.push import create_push_codec

    return create_push_codec(name, options)


def encode_push(codec: Any, key: str, flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The worker's side of the push adapter: :func:`distlearn.comm.compression.push.encode_push`."""
    from distlearn.comm.compression.push import encode_push as encode

    return encode(codec, key, flat, sizes)


def decode_push(codec: Any, wire: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The server's side of the push adapter: :func:`distlearn.comm.compression.push.decode_push`."""
    from distlearn.comm.compression.push import decode_push as decode

    return decode(codec, wire, sizes)


def _can_live_in(parameter: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether a worker's parameter may be rebound to a view of its shared reply block (same dtype, CPU,
    not itself shared: a Hogwild!-style shared parameter must stay where its other users see it)."""
    return parameter.dtype == view.dtype and parameter.device == view.device and not parameter.is_shared()


@dataclass
class PSOptions(CompressionOptions):
    """Options of the parameter server (``--strategy ps``); the codec, if any, compresses the pushes."""

    servers: int = 1
    """parameter-server ranks (the first S ranks); the rest are workers"""
    softsync: int = 1
    """apply gradients in groups of n (1: async, workers: synchronous)"""
    backup_workers: int = 0
    """b extra workers; each step uses the first R gradients, drops b"""
    local_steps: int = 1
    """pull and push every k local steps"""
    staleness_aware: bool = False
    """divide each gradient by its staleness (Zhang et al. 2016)"""
    worker_timeout: float = 60.0
    """seconds of silence after which a server drops a worker"""
    ps_shared_memory: bool = True
    """a worker and a server on the same machine move gradients and weights through shared memory
    (/dev/shm), headers over the backend; --no-ps-shared-memory: all over the backend"""

    aliases: ClassVar[dict[str, str]] = {
        **CompressionOptions.aliases,
        "worker_timeout_s": "worker_timeout",
        "shared_memory": "ps_shared_memory",
    }

    def validate(self) -> None:
        super().validate()
        for name in ("servers", "softsync", "local_steps"):
            positive(name, getattr(self, name), integer=True)
        positive("backup_workers", self.backup_workers, allow_zero=True, integer=True)
        positive("worker_timeout", self.worker_timeout)
        if self.compression != "none":
            make_push_codec(self.compression, self.codec_options())  # refuses codecs a push cannot use
        if self.backup_workers and self.softsync != 1:
            raise ConfigError(
                "--backup-workers and --softsync both set the group size; backup workers already apply "
                "each step on the first R gradients -- drop --softsync"
            )

    def check(self, run: Any) -> None:
        super().check(run)
        if optim.needs_closure(run.optimizer):
            raise ConfigError(
                f"--optimizer {run.optimizer} re-evaluates the loss inside its step, which a parameter "
                "server cannot do; choose a first-order optimizer (sgd, momentum, adam, ...)"
            )


class ParameterServer(Strategy):
    """Downpour-style asynchronous SGD on parameter servers (see the module docstring for the algorithm).

    Options: :class:`PSOptions` (servers ``S``, n-softsync, backup workers ``b``, ``k`` local steps,
    staleness-aware scaling, the worker timeout, shared memory, and the pushes' codec). Keywords for what
    the trainer otherwise takes from the run's config (``run``):

        optimizer: the servers' optimizer: a name for :func:`distlearn.optim.create`, or a callable
            building an optimizer over a list of tensors.
        lr, optimizer_options: its learning rate (None: the optimizer's default) and hyper-parameters.
            The lr a worker's optimizer has at the push (its schedule) travels in the header and is used.
        clip_grad_norm: clip each pushed gradient's 2-norm on the worker (None: no clipping).
        out: run directory: servers write ``ps-server<rank>.json`` (updates, staleness, drops) there and
            their checkpoints under ``out/checkpoints``.
        resume: the worker checkpoint the run resumes from; servers load their matching state.
        keep_checkpoints: server checkpoints kept on disk.
        gate: optional :class:`PushGate` called around each push (for deterministic schedules).
    """

    name = "ps"
    Options = PSOptions

    def __init__(
        self,
        options: PSOptions | None = None,
        /,
        *,
        run: Any = None,
        optimizer: str | OptimizerFactory | None = None,
        lr: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
        clip_grad_norm: float | None = None,
        out: str | Path | None = None,
        resume: str | Path | None = None,
        keep_checkpoints: int | None = None,
        gate: PushGate | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(options, run=run, **fields)
        o = self.options
        self.shared_memory = o.ps_shared_memory
        self.compression = o.compression
        self.compression_options = o.codec_options()
        self.compressor: Any = None  # the worker's encoder (its residuals); servers build their own decoder
        if o.compression != "none":
            self.compressor = make_push_codec(o.compression, self.compression_options)
        self.servers = o.servers
        self.softsync = o.softsync
        self.backup_workers = o.backup_workers
        self.local_steps = o.local_steps
        self.staleness_aware = o.staleness_aware
        self.worker_timeout_s = o.worker_timeout
        # The servers' optimizer and the run's files: the run's settings, or the keywords in a user's loop.
        self.optimizer_spec = optimizer if optimizer is not None else getattr(run, "optimizer", "sgd")
        self.lr = lr if lr is not None else getattr(run, "lr", None)
        self.optimizer_options = dict(
            optimizer_options
            if optimizer_options is not None
            else parse_options(getattr(run, "optimizer_option", ()))
        )
        def of_run(value: Any, name: str, default: Any = None) -> Any:
            return value if value is not None else getattr(run, name, default)

        self.clip_grad_norm = of_run(clip_grad_norm, "clip_grad_norm")
        out = of_run(out, "out")
        self.out = Path(out) if out is not None else None
        self.resume = of_run(resume, "resume")
        self.keep_checkpoints = of_run(keep_checkpoints, "keep_checkpoints", 2)
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        self.gate = gate
        self._context: DistContext | None = None
        self._owns_group = False
        self.transport: Transport | None = None
        # worker state
        self._params: list[torch.Tensor] = []
        self._plan: list[list[int]] = []
        self._versions: list[int] = []
        self._accumulated: list[torch.Tensor] | None = None
        self._local = 0
        self._pushes = 0
        self._steps_done = 0
        self._staleness_window: list[float] = []
        self.staleness_seen: list[list[int]] = []
        """Per push, the staleness each server recorded for it (-1: dropped as late)."""
        self._reply_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._push_buffers: list[torch.Tensor] = []
        self._shared: dict[int, tuple[int, SharedBlock, SharedBlock]] = {}  # server -> (token, push, reply)
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._heartbeat_error: BaseException | None = None
        self.server_report: dict[str, Any] = {}

    # -- roles ----------------------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Number of worker ranks ``W`` (``R + b``)."""
        return self.world_size - self.servers

    @property
    def is_main(self) -> bool:
        """The first worker does the job's I/O (rank 0 is a server and never runs the loop)."""
        return self.rank == self.servers

    @property
    def replicas(self) -> int:
        return max(1, self.workers)

    @property
    def replica_index(self) -> int:
        return max(0, self.rank - self.servers)

    @property
    def group_size(self) -> int:
        """Gradients per server update: ``n`` (softsync) or ``R`` (backup workers)."""
        return self.workers - self.backup_workers if self.backup_workers else self.softsync

    def setup(self, seed: int) -> None:
        usage = (
            "runs one process per server and per worker: use `distlearn train --strategy ps "
            "--workers N --servers S` (N counts both), or start the job with torchrun"
        )
        if not self.join_job(usage, self.timeout_s):
            return
        if self.workers < 1:
            raise ConfigError(
                f"{self.world_size} processes leave no worker after {self.servers} server(s); "
                f"use --workers {self.servers + 1} or more (servers + workers)"
            )
        if self.backup_workers >= self.workers:
            raise ConfigError(
                f"--backup-workers {self.backup_workers} leaves no worker of {self.workers} to take the "
                f"step; use at most {self.workers - 1}"
            )
        if self.softsync > self.workers:
            raise ConfigError(
                f"--softsync {self.softsync} exceeds the {self.workers} workers (n = R is synchronous); "
                f"use at most {self.workers}"
            )
        self.role = "server" if self.rank < self.servers else "worker"
        self.transport = Transport(self.rank, timeout_s=self.timeout_s)

    # -- data: R + b workers each see M = B / R examples ----------------------------------------------------

    def local_batch(self, global_batch: int) -> int:
        takers = self.workers - self.backup_workers
        if global_batch < 1 or global_batch % takers:
            raise ConfigError(
                f"global batch {global_batch} must be a positive multiple of the {takers} workers whose "
                f"gradients make a step; use --batch-size {max(1, global_batch // takers) * takers}"
            )
        return global_batch // takers

    def steps_per_epoch(self, n: int, global_batch: int) -> int:
        return n // (self.local_batch(global_batch) * self.workers)

    def batches(
        self, n: int, *, global_batch: int, seed: int, epoch: int, start_step: int = 0
    ) -> Iterator[torch.Tensor]:
        local = self.local_batch(global_batch)
        return epoch_batches(
            n,
            global_batch=local * self.workers,
            seed=seed,
            epoch=epoch,
            rank=self.replica_index,
            world_size=self.workers,
            start_step=start_step,
        )

    # -- worker side ----------------------------------------------------------------------------------------

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._plan = shard_parameters([p.numel() for p in self._params], self.servers)
        self._versions = [0] * self.servers
        self._pull(initial=True)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="ps-heartbeat", daemon=True)
        self._heartbeat.start()
        return model, optimizer

    def _shard_values(self, server: int) -> torch.Tensor:
        indices = self._plan[server]
        sizes = torch.tensor([float(self._params[i].numel()) for i in indices], dtype=torch.float64)
        if not indices:
            return sizes
        values = torch.cat([self._params[i].detach().reshape(-1).double() for i in indices])
        return torch.cat([sizes, values])

    def _pull(self, initial: bool) -> None:
        """Send INIT (our layout and initial values) to every server and load the weights they answer.

        At the first pull each INIT also offers two shared-memory blocks (their token in ``step``); a
        server on this machine maps them and says so in its answer, and from then on the payloads of this
        pair go through them (see "Transport" in the module docstring).
        """
        assert self.transport is not None
        offers = {s: self._offer(s) for s in range(self.servers) if s not in self._shared}
        try:
            replies = self._post_replies("the initial pull" if initial else "the pull after resuming")
            pending = []
            for server in range(self.servers):
                payload = self._shard_values(server)
                offer = self._shared.get(server) or offers.get(server)
                header = Header(
                    Kind.INIT, step=offer[0] if offer else 0, length=payload.numel(),
                    flag=len(self._plan[server]), sender=self.rank,
                )  # fmt: skip
                pending += self.transport.isend(server, header, payload, tag=REQUEST)
            self.transport.finish(pending)
            for server, reply in enumerate(replies):
                header = self._receive_params(server, reply)
                offer = offers.get(server)
                if offer is not None and header.flag & _SHARED_ACCEPTED:
                    self._shared[server] = offer
                    self._reply_buffers[server] = (self._reply_buffers[server][0], offer[2].tensor)
                    self._push_buffers = []  # rebuilt on the next push, the shared ones in place
        finally:  # a server that mapped the blocks unlinked them; the rest go here, even after an error
            for offer in offers.values():
                if offer is not None:
                    offer[1].unlink()
                    offer[2].unlink()

    def _offer(self, server: int) -> tuple[int, SharedBlock, SharedBlock] | None:
        """New push and reply blocks for ``server`` (None: shared memory off, an empty shard, or no room)."""
        numel = sum(self._params[i].numel() for i in self._plan[server])
        if not self.shared_memory or not numel:
            return None
        token = new_token()
        push = SharedBlock.create(token, "push", numel)
        reply = SharedBlock.create(token, "reply", numel) if push is not None else None
        if push is None or reply is None:
            if push is not None:
                push.unlink()
            return None
        return token, push, reply

    def _post_replies(self, what: str) -> list[tuple[torch.Tensor, Any, torch.Tensor, Any]]:
        """Post every server's reply receives (header and parameters) before sending the requests."""
        assert self.transport is not None
        replies = []
        if not self._reply_buffers:  # reused by every pull: a pull completes before the next is posted
            self._reply_buffers = [
                (
                    torch.empty(HEADER_SIZE, dtype=torch.float64),
                    torch.empty(sum(self._params[i].numel() for i in self._plan[s]), dtype=torch.float32),
                )
                for s in range(self.servers)
            ]
        for server in range(self.servers):
            head, flat = self._reply_buffers[server]
            head_work = self.transport.post_recv(server, head, tag=REPLY, what=f"{what} (reply header)")
            flat_work = (
                self.transport.post_recv(server, flat, tag=REPLY + 1, what=f"{what} (parameters)")
                if flat.numel() and server not in self._shared  # shared: the weights arrive in the block
                else None
            )
            replies.append((head, head_work, flat, flat_work))
        return replies

    def _receive_params(self, server: int, reply: tuple[torch.Tensor, Any, torch.Tensor, Any]) -> Header:
        assert self.transport is not None
        head, head_work, flat, flat_work = reply
        header = Header.from_tensor(self.transport.complete(head_work, head))
        if header.kind == Kind.ERROR:
            raise ConfigError(
                f"server rank {server} refused worker rank {self.rank}: this worker's model does not match "
                "the parameters the server holds (different architecture, or a checkpoint of another model); "
                "every process must build the same --model"
            )
        if header.kind != Kind.PARAMS or header.length != flat.numel():
            raise CommError(
                f"rank {self.rank}: expected PARAMS of {flat.numel()} numbers from server rank {server}, got "
                f"{header.kind.name} of {header.length}: the processes run different protocol versions"
            )
        if flat_work is not None:
            self.transport.complete(flat_work, flat)
        elif server in self._shared:
            if not header.flag & _VIA_SHARED:
                raise CommError(
                    f"rank {self.rank}: server rank {server} answered without the shared block it accepted: "
                    "the processes run different protocol versions"
                )
            self.transport.count_shared(received=flat.numel() * flat.element_size())
        shared = server in self._shared
        offset = 0
        with torch.no_grad():
            for i in self._plan[server]:
                p = self._params[i]
                source = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.data_ptr() == source.data_ptr():
                    continue  # the parameter lives in the shared reply block: the server wrote it there
                if shared and _can_live_in(p, source):
                    p.data = source  # from now on the pull costs no copy (the block is ours until we push)
                else:
                    p.copy_(source)
        self._versions[server] = header.version
        return header

    def _beat(self) -> None:
        assert self.transport is not None
        interval = self.worker_timeout_s / 4
        while not self._stop.wait(interval):
            try:
                for server in range(self.servers):
                    self.transport.send(server, Header(Kind.HEARTBEAT, sender=self.rank), tag=REQUEST)
            except BaseException as error:  # the main loop reports the dead server on its next message
                self._heartbeat_error = error
                return

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        if self.local_steps > 1:
            if self._accumulated is None:
                self._accumulated = [torch.zeros_like(p) for p in self._params]
            for total, p in zip(self._accumulated, self._params, strict=True):
                if p.grad is not None:
                    total.add_(p.grad)
        self._local += 1
        if self._local % self.local_steps:
            return  # a local step: the worker's own optimizer applies this gradient
        gradients = self._accumulated or [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params
        ]
        self._exchange(gradients, float(optimizer.param_groups[0]["lr"]), step)
        for p in self._params:
            p.grad = None  # the server applied it: the worker's optimizer.step() does nothing this step
        if self._accumulated is not None:
            for total in self._accumulated:
                total.zero_()

    def _exchange(self, gradients: list[torch.Tensor], lr: float, step: int) -> None:
        assert self.transport is not None
        if self.gate is not None:
            self.gate.before_push(self.replica_index, self._pushes)
        replies = self._post_replies(f"the pull after push {self._pushes}")
        if not self._push_buffers:  # the shared push block where the server mapped one
            self._push_buffers = [
                self._shared[s][1].tensor
                if s in self._shared
                else torch.empty(sum(self._params[i].numel() for i in self._plan[s]), dtype=torch.float32)
                for s in range(self.servers)
            ]
        pending = []
        for server in range(self.servers):
            indices = self._plan[server]
            payload = self._push_buffers[server]  # reused: the send completes before the next push
            if indices:
                torch.cat([gradients[i].detach().reshape(-1).float() for i in indices], out=payload)
            flag = 0
            if self.compressor is not None and payload.numel():
                sizes = [self._params[i].numel() for i in indices]
                payload = encode_push(self.compressor, f"server{server}", payload, sizes)
                flag = _PUSH_COMPRESSED
            elif server in self._shared:
                flag = _PUSH_SHARED  # the gradient is in the block already: send the header alone
                self.transport.count_shared(sent=payload.numel() * payload.element_size())
            header = Header(
                Kind.PUSH, version=self._versions[server], step=step, length=payload.numel(), lr=lr,
                flag=flag, sender=self.rank,
            )  # fmt: skip
            wire = None if flag == _PUSH_SHARED else payload
            pending += self.transport.isend(server, header, wire, tag=REQUEST)
        self.transport.finish(pending)
        seen = []
        for server, reply in enumerate(replies):
            header = self._receive_params(server, reply)
            staleness = int(header.staleness) if not header.flag & _DROPPED else -1
            seen.append(staleness)
            if staleness >= 0:
                self._staleness_window.append(staleness)
        self.staleness_seen.append(seen)
        if self.gate is not None:
            self.gate.after_pull(self.replica_index, self._pushes)
        self._pushes += 1

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._steps_done = step + 1

    def barrier(self) -> None:
        """No barrier: workers finish independently (a dead worker must not block the others)."""

    def stats(self) -> StrategyStats:
        if self.transport is None:
            return {}
        result: StrategyStats = {
            "bytes_sent": int(self.transport.bytes_sent),
            "bytes_received": int(self.transport.bytes_received),
        }
        if self._staleness_window:
            result["staleness"] = sum(self._staleness_window) / len(self._staleness_window)
            self._staleness_window = []
        return result

    def state_dict(self) -> dict[str, Any]:
        """Ask every server to checkpoint now (tagged with this worker's step) and record their versions."""
        if self.role != "worker" or self.transport is None:
            return {}
        acks = []
        for server in range(self.servers):
            head = torch.empty(HEADER_SIZE, dtype=torch.float64)
            acks.append((head, self.transport.post_recv(server, head, tag=REPLY, what="the checkpoint ack")))
        pending = []
        for server in range(self.servers):
            header = Header(Kind.CHECKPOINT, step=self._steps_done, sender=self.rank)
            pending += self.transport.isend(server, header, tag=REQUEST)
        self.transport.finish(pending)
        versions = []
        for server, (head, handle) in enumerate(acks):
            header = Header.from_tensor(self.transport.complete(handle, head))
            if header.kind != Kind.ACK:
                raise CommError(
                    f"rank {self.rank}: server rank {server} answered a checkpoint with {header.kind.name}"
                )
            versions.append(header.version)
        state: dict[str, Any] = {
            "server_step": self._steps_done,
            "server_versions": versions,
            "local": self._local,
            "pushes": self._pushes,
        }
        if self._accumulated is not None:
            state["accumulated"] = [t.clone() for t in self._accumulated]
        if self.compressor is not None:
            state["compression"] = self.compressor.state_dict()  # the residuals of this worker's pushes
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._local = int(state["local"])
        self._pushes = int(state["pushes"])
        if self.compressor is not None and "compression" in state:
            self.compressor.load_state_dict(state["compression"])
        if "accumulated" in state:
            self._accumulated = [t.clone() for t in state["accumulated"]]
        if self.role == "worker" and self.transport is not None and self._params:
            self._pull(initial=False)  # the trainer just loaded the checkpoint's weights: take the servers'

    def close(self) -> None:
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join(timeout=self.worker_timeout_s)
            self._heartbeat = None
        if self.role == "worker" and self.transport is not None and self._context is not None:
            for server in range(self.servers):
                with contextlib.suppress(CommError):  # a server that is gone needs no goodbye
                    self.transport.send(
                        server, Header(Kind.DONE, sender=self.rank), tag=REQUEST, timeout_s=10
                    )
        self._shared.clear()  # names were unlinked at the pull; the mappings go with the tensors
        self._push_buffers, self._reply_buffers = [], []
        if self._owns_group:
            shutdown()
            self._owns_group = False
        self._context = None

    # -- server side ----------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run this server until every worker is done or dead (see :class:`_ServerLoop`)."""
        assert self.transport is not None
        loop = _ServerLoop(self)
        try:
            loop.run()
        finally:
            self.server_report = loop.report()
            loop.write_report()

    def describe(self) -> str:
        mode = (
            f"backup b={self.backup_workers}"
            if self.backup_workers
            else ("async" if self.softsync == 1 else f"{self.softsync}-softsync")
        )
        extras = (", staleness-aware" if self.staleness_aware else "") + (
            f", k={self.local_steps} local steps" if self.local_steps > 1 else ""
        )
        where = f"rank {self.rank} {self.role}"
        return f"ps ({self.servers} server(s), {self.workers} workers, {mode}{extras}; {where})"


class _ServerLoop:
    """One server: its shard, optimizer, version, pending group and the live set of workers."""

    def __init__(self, strategy: ParameterServer) -> None:
        self.s = strategy
        self.transport = strategy.transport
        self.rank = strategy.rank
        self.version = 0
        self.sizes: list[int] | None = None
        self.flat: torch.Tensor | None = None
        self.grad_flat: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tensors: list[torch.Tensor] = []  # the optimizer's parameters: views of `flat`
        self._grads_on: torch.Tensor | None = None  # what their gradients are views of
        self.pending: list[tuple[int, int, float, torch.Tensor, float]] = []
        worker_ranks = range(strategy.servers, strategy.world_size)
        self.live = set(worker_ranks)
        self.last_heard = {w: time.monotonic() for w in worker_ranks}
        self.done: list[int] = []
        self.dead: list[int] = []
        self.updates: list[list[int]] = []  # [version before the update, worker rank, staleness]
        self.dropped: dict[int, int] = {}  # version -> late gradients dropped
        self.pushes = 0
        self.free: list[torch.Tensor] = []  # gradient buffers to reuse once their group is applied
        self.shared: dict[int, tuple[int, SharedBlock, SharedBlock]] = {}  # worker -> (token, push, reply)
        self.decoder = (
            make_push_codec(strategy.compression, strategy.compression_options)
            if strategy.compression != "none"
            else None
        )
        self.started = time.monotonic()
        self.resumed_from: int | None = None
        self._restore()

    # state -------------------------------------------------------------------------------------------------

    def _checkpoint_dir(self) -> Path | None:
        return None if self.s.out is None else self.s.out / "checkpoints"

    def _file(self, directory: Path, step: int) -> Path:
        return directory / f"ps-server{self.rank}-step{step:08d}.pt"

    def _restore(self) -> None:
        if self.s.resume is None:
            return
        from distlearn.checkpoint import latest_checkpoint, load_checkpoint

        path = Path(self.s.resume)
        if path.is_dir():
            path = latest_checkpoint(path) or path
        state = load_checkpoint(path)["strategy"]
        if "server_step" not in state:
            raise CheckpointError(f"{path} was not written by a ps run (no server_step); drop --resume")
        file = self._file(path.parent, int(state["server_step"]))
        if not file.is_file():
            raise CheckpointError(
                f"server rank {self.rank}: {file} is missing -- the worker checkpoint {path} needs the "
                "servers' files written with it; copy them next to it or resume from an older checkpoint"
            )
        saved = torch.load(file, map_location="cpu", weights_only=True)
        self._build([int(n) for n in saved["sizes"].tolist()])
        assert self.flat is not None and self.optimizer is not None
        self.flat.copy_(saved["flat"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.version = int(saved["version"])
        self.resumed_from = self.version
        self.updates = saved["updates"].tolist()
        self.dropped = {int(v): int(c) for v, c in saved["dropped"].tolist()}
        self.pushes = int(saved["pushes"])
        _log(f"server rank {self.rank} resumed from {file} at version {self.version}")

    def _build(self, sizes: list[int]) -> None:
        self.sizes = sizes
        total = sum(sizes)
        self.flat = torch.zeros(total, dtype=torch.float32)
        self.grad_flat = torch.zeros(total, dtype=torch.float32)
        tensors = []
        offset = 0
        for n in sizes:
            tensor = self.flat[offset : offset + n]
            tensor.requires_grad_(True)
            tensor.grad = self.grad_flat[offset : offset + n]
            tensors.append(tensor)
            offset += n
        self.tensors, self._grads_on = tensors, self.grad_flat
        spec = self.s.optimizer_spec
        if callable(spec):
            self.optimizer = spec(tensors)
        else:
            self.optimizer = optim.create(spec, tensors, lr=self.s.lr, **self.s.optimizer_options)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]

    def state(self) -> dict[str, Any]:
        assert self.flat is not None and self.optimizer is not None and self.sizes is not None
        return {
            "sizes": torch.tensor(self.sizes, dtype=torch.int64),
            "flat": self.flat.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "updates": torch.tensor(self.updates, dtype=torch.int64).reshape(-1, 3),
            "dropped": torch.tensor(sorted(self.dropped.items()), dtype=torch.int64).reshape(-1, 2),
            "pushes": self.pushes,
        }

    def save(self, step: int) -> None:
        directory = self._checkpoint_dir()
        if directory is None or self.flat is None:
            return
        directory.mkdir(parents=True, exist_ok=True)
        final = self._file(directory, step)
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            torch.save(self.state(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        mine = sorted(directory.glob(f"ps-server{self.rank}-step*.pt"))
        for old in mine[: -self.s.keep_checkpoints]:
            old.unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        staleness = [u[2] for u in self.updates]
        return {
            "rank": self.rank,
            "version": self.version,
            "resumed_from": self.resumed_from,
            "pushes": self.pushes,
            "applied": len(self.updates),
            "dropped": sum(self.dropped.values()),
            "dropped_per_version": {str(v): c for v, c in sorted(self.dropped.items())},
            "updates": self.updates,
            "mean_staleness": sum(staleness) / len(staleness) if staleness else None,
            "max_staleness": max(staleness) if staleness else None,
            "done_workers": self.done,
            "dead_workers": self.dead,
            "seconds": time.monotonic() - self.started,
        }

    def write_report(self) -> None:
        if self.s.out is None:
            return
        self.s.out.mkdir(parents=True, exist_ok=True)
        (self.s.out / f"ps-server{self.rank}.json").write_text(json.dumps(self.report(), indent=1))
        if self.flat is not None:
            torch.save(self.state(), self.s.out / f"ps-server{self.rank}-final.pt")

    # the loop ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        assert self.transport is not None
        while self.live:
            waiting = self.transport.any_request()
            received = waiting.wait(self.s.worker_timeout_s)
            now = time.monotonic()
            if received is None:  # nobody spoke for a whole timeout: every live worker is dead
                for worker in sorted(self.live):
                    self._lose(worker, f"silent for {self.s.worker_timeout_s:g} s")
                break
            peer, header = received
            self.last_heard[peer] = now
            if peer in self.live:
                self._handle(peer, header)
            elif header.kind in (Kind.PUSH, Kind.INIT) and header.length and not self._shared_push(header):
                # a worker we declared dead came back: drain its payload, do not answer
                self.transport.recv_payload(peer, torch.empty(header.length, dtype=self._dtype(header)),
                                            tag=REQUEST, what="a late payload")  # fmt: skip
            for worker in sorted(self.live):
                if now - self.last_heard[worker] > self.s.worker_timeout_s:
                    self._lose(worker, f"silent for {now - self.last_heard[worker]:.1f} s")
            self._maybe_apply()

    @staticmethod
    def _shared_push(header: Header) -> bool:
        return header.kind == Kind.PUSH and bool(header.flag & _PUSH_SHARED)

    @staticmethod
    def _dtype(header: Header) -> torch.dtype:
        return torch.float64 if header.kind == Kind.INIT else torch.float32

    def _lose(self, worker: int, why: str) -> None:
        if worker not in self.live:
            return
        self.live.discard(worker)
        self.dead.append(worker)
        # its pending gradient, if any, still counts; it is just not answered
        _log(
            f"server rank {self.rank}: worker rank {worker} {why}; continuing with {len(self.live)} "
            f"worker(s) at version {self.version}"
        )

    def _reply(
        self, worker: int, header: Header, payload: torch.Tensor | None = None, *, shared: bool | None = None
    ) -> None:
        """Answer ``worker``; the payload goes through its shared reply block if it has one (``shared``
        overrides: the answer to the INIT that offers the blocks still goes over the backend)."""
        assert self.transport is not None
        if payload is not None and (worker in self.shared if shared is None else shared):
            self.shared[worker][2].tensor.copy_(payload)
            self.transport.count_shared(sent=payload.numel() * payload.element_size())
            header.flag |= _VIA_SHARED
            payload = None
        try:
            self.transport.send(worker, header, payload, tag=REPLY)
        except CommError as error:
            self._lose(worker, f"could not be answered ({str(error)[:160]})")

    def _params_header(self, staleness: float = 0.0, dropped: bool = False, accepted: bool = False) -> Header:
        assert self.flat is not None
        flag = (_DROPPED if dropped else 0) | (_SHARED_ACCEPTED if accepted else 0)
        return Header(Kind.PARAMS, version=self.version, length=self.flat.numel(), staleness=staleness,
                      flag=flag, sender=self.rank)  # fmt: skip

    def _handle(self, peer: int, header: Header) -> None:
        assert self.transport is not None
        kind = header.kind
        if kind == Kind.HEARTBEAT:
            return
        if kind == Kind.DONE:
            self.live.discard(peer)
            self.done.append(peer)
            return
        if kind == Kind.CHECKPOINT:
            self.save(header.step)
            self._reply(peer, Header(Kind.ACK, version=self.version, step=header.step, sender=self.rank))
            return
        if kind == Kind.INIT:
            payload = torch.empty(header.length, dtype=torch.float64)
            self.transport.recv_payload(peer, payload, tag=REQUEST, what="an initial shard")
            count = header.flag
            sizes = [int(n) for n in payload[:count].tolist()]
            if self.flat is None:
                self._build(sizes)
                assert self.flat is not None
                self.flat.copy_(payload[count:].float())
            if sizes != self.sizes:
                self._reply(peer, Header(Kind.ERROR, flag=_ERROR_LAYOUT, sender=self.rank))
                return
            token, known = header.step, self.shared.get(peer)
            if known is not None and known[0] == token:  # a pull after resuming: the blocks are mapped
                self._reply(peer, self._params_header(accepted=True), self.flat)
                return
            accepted = bool(token) and self.s.shared_memory and self._map_shared(peer, token)
            self._reply(peer, self._params_header(accepted=accepted), self.flat, shared=False)
            return
        if kind == Kind.PUSH:
            if header.flag == _PUSH_COMPRESSED:
                wire = torch.empty(header.length, dtype=torch.uint8)
                self.transport.recv_payload(peer, wire, tag=REQUEST, what="a compressed gradient")
                self.pushes += 1
                if self.decoder is None or self.flat is None:
                    self._reply(peer, Header(Kind.ERROR, flag=_ERROR_LAYOUT, sender=self.rank))
                    return
                gradient = decode_push(self.decoder, wire, self.sizes or [])
                header = Header(header.kind, header.version, header.step, gradient.numel(), header.lr)
            elif header.flag & _PUSH_SHARED:
                block = self.shared.get(peer)
                if block is None or block[1].tensor.numel() != header.length:
                    raise CommError(
                        f"server rank {self.rank}: rank {peer} pushed through a shared block this server has "
                        "not mapped: the processes run different protocol versions"
                    )
                gradient = block[1].tensor  # read in place: the worker waits for the reply before writing
                self.transport.count_shared(received=gradient.numel() * gradient.element_size())
                self.pushes += 1
            else:
                gradient = self.free.pop() if self.free and self.free[-1].numel() == header.length else None
                if gradient is None:
                    gradient = torch.empty(header.length, dtype=torch.float32)
                self.transport.recv_payload(peer, gradient, tag=REQUEST, what="a gradient")
                self.pushes += 1
            if self.flat is None or header.length != self.flat.numel():
                self._reply(peer, Header(Kind.ERROR, flag=_ERROR_LAYOUT, sender=self.rank))
                return
            staleness = self.version - header.version
            if self.s.backup_workers and header.version < self.version:
                self.dropped[header.version] = self.dropped.get(header.version, 0) + 1
                self._reply(peer, self._params_header(staleness, dropped=True), self.flat)
                return
            self.pending.append((peer, header.version, float(staleness), gradient, header.lr))
            return
        raise CommError(f"server rank {self.rank}: unexpected {kind.name} from rank {peer}")

    def _map_shared(self, worker: int, token: int) -> bool:
        """Map ``worker``'s push and reply blocks (unlinking their names); False if not on this machine."""
        assert self.flat is not None
        numel = self.flat.numel()
        push = SharedBlock.attach(token, "push", numel)
        reply = SharedBlock.attach(token, "reply", numel)
        if push is None or reply is None:
            return False
        self.shared[worker] = (token, push, reply)
        return True

    def _grads_from(self, source: torch.Tensor) -> None:
        """Make the optimizer's gradients views of ``source`` (a pushed gradient, or the group's mean).

        Saves one copy of the shard per update when a single gradient is applied as it came (from a shared
        block, or the receive buffer). An optimizer that keeps its own flat gradient (``flat=True``) copies
        replaced gradients back in itself, so the result is the same either way.
        """
        if source is self._grads_on:
            return
        offset = 0
        for tensor in self.tensors:
            tensor.grad = source[offset : offset + tensor.numel()]
            offset += tensor.numel()
        self._grads_on = source

    def _shared_push_block(self, tensor: torch.Tensor) -> bool:
        return any(tensor is push.tensor for _, push, _ in self.shared.values())

    def _maybe_apply(self) -> None:
        if not self.pending:
            return
        waiting_live = sum(1 for entry in self.pending if entry[0] in self.live)
        need = min(self.s.group_size, max(1, len(self.live)))
        if len(self.pending) < need and waiting_live < len(self.live):
            return
        group = sorted(self.pending, key=lambda entry: entry[0])
        self.pending = []
        self._apply(group)

    def _apply(self, group: list[tuple[int, int, float, torch.Tensor, float]]) -> None:
        assert self.optimizer is not None and self.grad_flat is not None and self.flat is not None
        scales = [1.0 / max(1.0, entry[2]) if self.s.staleness_aware else 1.0 for entry in group]
        if len(group) == 1 and scales[0] == 1.0:
            self._grads_from(group[0][3])  # one gradient as it is: the optimizer reads it where it lies
        else:
            self._grads_from(self.grad_flat)
            for index, ((_, _, _, gradient, _), scale) in enumerate(zip(group, scales, strict=True)):
                if index == 0:
                    torch.mul(gradient, scale, out=self.grad_flat) if scale != 1.0 else self.grad_flat.copy_(
                        gradient
                    )
                else:
                    self.grad_flat.add_(gradient, alpha=scale)
            if len(group) > 1:
                self.grad_flat.div_(len(group))
        for _, _, _, gradient, _ in group:
            if not self._shared_push_block(gradient):
                self.free.append(gradient)  # a worker's shared block is not ours to reuse
        lrs = [lr for *_, lr in group if lr > 0]
        if lrs:
            lr = sum(lrs) / len(lrs)
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr
        self.optimizer.step()
        for worker, _, staleness, _, _ in group:
            self.updates.append([self.version, worker, int(staleness)])
        self.version += 1
        for worker, _, staleness, _, _ in group:
            if worker in self.live:
                self._reply(worker, self._params_header(staleness), self.flat)
