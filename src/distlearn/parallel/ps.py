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

Transport: the parameter-server core :mod:`distlearn.comm.paramserver` (a fixed header plus a payload over
c10d point-to-point, :mod:`distlearn.comm.p2p`): the servers run its serving loop with the policy
:class:`~distlearn.parallel.ps_server.DownpourServer`, each worker (:mod:`distlearn.parallel.ps_worker`) one
link per server.
When a worker and a server share a machine (found out at the first pull: the server can map the shared-memory
blocks the worker created, :mod:`distlearn.comm.shm`), the payloads -- the pushed gradient and the weights
of the reply -- go through two blocks both processes map, and only the header travels over the backend:
one small message each way per push instead of a header and a payload each way through loopback TCP. The
server's optimizer reads a single pushed gradient in the block, and the worker's parameters are rebound to
views of its reply block at the first shared pull, so neither side copies the shard (a parameter that
something else rebound since is copied into instead). Compressed pushes still send their packed bytes over
the backend; ``shared_memory=False`` (``--no-ps-shared-memory``) sends all over it, as between machines.

Fault handling: a server posts one receive per worker, so a worker that dies (its connection closes) is lost
at once and alone; workers send heartbeats (a header without payload) every ``worker_timeout / 4`` seconds
from the moment they join; a server that hears nothing from a worker for ``worker_timeout`` seconds, or
cannot receive from or answer it, logs it (rank, time, the step of its last push: also in its report's
``lost_workers``), drops it from the live set (groups then close with the workers that are left) and
continues. A worker whose server died ends with a :class:`~distlearn.errors.CommError` naming the server
and the operation.
The servers stop when every live worker has said it is done. Checkpoints: when the main worker (the first
worker rank) checkpoints, each server saves its shard, optimizer state, version and logs next to it
(``ps-server<rank>-step<N>.pt``); ``--resume`` brings them back and the version count continues.

Devices: the servers keep their shards and optimizer state in host memory whatever ``--device`` says, and
every payload travels as a CPU tensor over gloo (``backend`` is gloo on every rank). A worker on CUDA
(``--device cuda``; ranks may share a GPU, ``cuda:(LOCAL_RANK mod GPUs)``, since the servers use none)
computes on its GPU and stages each exchange through pinned host buffers: the gradient is copied to the
host before the push, the weights of the reply to the device after it. Why not NCCL: servers shared by
several workers answer one request at a time in arrival order (any-source receives, which NCCL does not
have), several ranks of one machine may share one GPU (NCCL refuses two ranks on one device), and the
shared-memory path between a worker and a server of one machine needs host memory anyway.

Not synchronised: module buffers (BatchNorm running statistics) stay local to each worker, as in Downpour.
The server's parameters are 1-D views of one flat buffer (one message per server per push), which every
element-wise optimizer (all of distlearn.optim's first-order ones, torch's SGD/Adam/...) treats exactly as
the original shapes. ``distlearn train`` starts the ranks as plain processes (``launcher = "ranks"``,
:mod:`distlearn.ranklaunch`) under the policy of :meth:`ParameterServer.rank_policy`: a lost worker stops
nobody, a lost server ends the job (torchrun's agent would stop the whole job when any process fails).

Tuning: staleness grows with the number of workers (about ``R - 1`` for round-robin arrival); lower the rate
or use staleness-aware updates when ``R`` is large; softsync ``n`` trades throughput (``n = 1``) for the
synchronous trajectory (``n = R``); ``b = 1`` or ``2`` backup workers cut the straggler tail; ``k`` > 1
divides the messages by ``k`` at the cost of larger, staler updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distlearn import optim
from distlearn.comm.p2p import Transport
from distlearn.comm.paramserver import Heartbeat, shard_parameters
from distlearn.config import parse_options, positive
from distlearn.errors import ConfigError
from distlearn.launch import DistContext, shutdown
from distlearn.parallel.base import (
    Strategy,
    StrategyOptions,
    StrategyStats,
    check_global_batch,
    epoch_batches,
)
from distlearn.parallel.ps_codecs import decode_push, encode_push, make_push_codec
from distlearn.parallel.ps_server import DownpourServer, ServerSettings
from distlearn.parallel.ps_worker import DownpourWorker, PushGate
from distlearn.parallel.sync import CompressionOptions
from distlearn.ranklaunch import RankPolicy

__all__ = [
    "PSOptions",
    "ParameterServer",
    "PushGate",
    "decode_push",
    "encode_push",
    "make_push_codec",
    "shard_parameters",
]

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


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

    def batch_takers(self, processes: int) -> int:
        """The workers whose gradients make a step: all but the servers and the backup workers."""
        return processes - self.servers - self.backup_workers

    def idle_ranks(self, processes: int) -> tuple[int, ...]:
        return tuple(range(self.servers))  # the servers

    def check_job(self, run: Any, processes: int) -> None:
        self.check_roles(processes)
        check_global_batch(
            run.batch_size, self.batch_takers(processes), "workers whose gradients make a step"
        )

    def check_roles(self, processes: int) -> None:
        """ConfigError unless a job of ``processes`` ranks has a worker after the servers, and enough
        workers for ``--backup-workers`` and ``--softsync``."""
        workers = processes - self.servers
        split = f"--workers {processes} counts servers and workers together"
        if workers < 1:
            raise ConfigError(
                f"--strategy ps with --servers {self.servers} needs at least one worker besides the servers, "
                f"and {processes} process(es) leave none ({split}); use --workers {self.servers + 1} "
                f"or more, or fewer --servers"
            )
        if self.backup_workers >= workers:
            raise ConfigError(
                f"--backup-workers {self.backup_workers} leaves no worker of {workers} to take the step "
                f"({split}); use at most {workers - 1}, or --workers {self.servers + self.backup_workers + 1}"
            )
        if self.softsync > workers:
            raise ConfigError(
                f"--softsync {self.softsync} exceeds the {workers} worker(s) (n = R is synchronous; {split}, "
                f"{self.servers} of them server(s)); use --softsync {workers} or less, or "
                f"--workers {self.servers + self.softsync}"
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
    shares_device = True  # the servers compute nothing on a GPU: workers may share one with them
    amp_modes = ("none", "bf16")  # a worker pushes in before_step, before fp16's scaler could unscale or skip
    launcher = "ranks"

    @classmethod
    def rank_policy(cls, options: StrategyOptions, run: Any) -> RankPolicy:
        """A lost worker stops nobody; a lost server ends the job; the servers and the main worker (rank
        ``S``: metrics, evaluations, checkpoints) must finish for the job to succeed."""
        assert isinstance(options, PSOptions)
        servers = range(options.servers)
        roles = {rank: "server" if rank < options.servers else "worker" for rank in range(int(run.workers))}
        reports = ", ".join(f"ps-server{rank}.json" for rank in servers)
        return RankPolicy(
            essential=frozenset(servers), required=frozenset([*servers, options.servers]), roles=roles,
            after_loss=f"The servers' reports say at which step: {Path(run.out)} ({reports}, lost_workers).",
        )  # fmt: skip

    @property
    def backend(self) -> str:
        """gloo whatever the device: the servers keep their state in host memory and every payload goes
        point-to-point as a CPU tensor (gloo's send/recv); CUDA workers stage it through pinned buffers."""
        return "gloo"

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
        self._versions: list[int] = []  # the version of each server's shard in this worker's last pull
        self.staleness_seen: list[list[int]] = []
        """Per push, the staleness each server recorded for it (-1: dropped as late)."""
        self._worker: DownpourWorker | None = None  # the worker side, built by prepare()
        self._heartbeat: Heartbeat | None = None  # a worker's, from setup() on (while it loads its data)
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
        self.options.check_roles(self.world_size)
        self.role = "server" if self.rank < self.servers else "worker"
        self.transport = Transport(self.rank, timeout_s=self.timeout_s)
        if self.role == "worker":  # a server counts a worker's silence from its own start
            self._heartbeat = Heartbeat(self.transport, list(range(self.servers)), self.worker_timeout_s / 4)
            self._heartbeat.start()

    # -- data: R + b workers each see M = B / R examples ----------------------------------------------------

    def local_batch(self, global_batch: int) -> int:
        takers = self.workers - self.backup_workers
        check_global_batch(global_batch, takers, "workers whose gradients make a step")
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
        assert self.transport is not None
        self._worker = DownpourWorker(
            self.transport,
            self.servers,
            [p for p in model.parameters() if p.requires_grad],
            replica_index=self.replica_index,
            local_steps=self.local_steps,
            clip_grad_norm=self.clip_grad_norm,
            worker_timeout_s=self.worker_timeout_s,
            shared_memory=self.shared_memory,
            gate=self.gate,
            compressor=self.compressor,
            staleness_seen=self.staleness_seen,
            versions=self._versions,
            device=self.device,
            heartbeat=self._heartbeat,
        )
        self._worker.start()
        return model, optimizer

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        assert self._worker is not None
        self._worker.before_step(optimizer, step)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self._worker is not None:
            self._worker.steps_done = step + 1

    def barrier(self) -> None:
        """No barrier: workers finish independently (a dead worker must not block the others)."""

    def stats(self) -> StrategyStats:
        if self.transport is None:
            return {}
        result: StrategyStats = {
            "bytes_sent": int(self.transport.bytes_sent),
            "bytes_received": int(self.transport.bytes_received),
        }
        staleness = self._worker.mean_staleness() if self._worker is not None else None
        if staleness is not None:
            result["staleness"] = staleness
        return result

    def run_summary(self) -> dict[str, Any]:
        """The staleness of this worker's pushes as the servers reported it (mean and max over every
        server's reply, in versions) and how many pushes were dropped as late; the servers' own reports
        (``ps-server<rank>.json``) hold every worker's."""
        seen = [s for push in self.staleness_seen for s in push]
        applied = [s for s in seen if s >= 0]
        return {
            "staleness_mean": sum(applied) / len(applied) if applied else None,
            "staleness_max": max(applied) if applied else None,
            "staleness_pushes": len(self.staleness_seen),
            "pushes_dropped": len(seen) - len(applied),
        }

    def state_dict(self) -> dict[str, Any]:
        """Ask every server to checkpoint now (tagged with this worker's step) and record their versions."""
        if self.role != "worker" or self._worker is None:
            return {}
        return self._worker.checkpoint()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.role == "worker" and self._worker is not None:
            self._worker.restore(state)

    def close(self) -> None:
        if self._worker is not None:  # kept: its versions and staleness stay readable after the run
            if self._context is not None:
                self._worker.close()
            else:
                self._worker.stop_heartbeat()
        if self._heartbeat is not None:  # also when the worker failed before prepare()
            self._heartbeat.stop(self.worker_timeout_s)
        if self._owns_group:
            shutdown()
            self._owns_group = False
        self._context = None

    # -- server side ----------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run this server until every worker is done or dead (the policy
        :class:`~distlearn.parallel.ps_server.DownpourServer` on the core's
        :class:`~distlearn.comm.paramserver.ServingLoop`)."""
        assert self.transport is not None
        settings = ServerSettings(
            group_size=self.group_size, backup_workers=self.backup_workers,
            staleness_aware=self.staleness_aware, optimizer_spec=self.optimizer_spec, lr=self.lr,
            optimizer_options=self.optimizer_options, shared_memory=self.shared_memory,
            compression=self.compression, compression_options=self.compression_options, out=self.out,
            resume=self.resume, keep_checkpoints=self.keep_checkpoints,
        )  # fmt: skip
        server = DownpourServer(settings, self.rank)
        try:
            server.run(self.transport, range(self.servers, self.world_size), self.worker_timeout_s)
        finally:
            self.server_report = server.report()
            server.write_report(self.server_report)

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
