"""The Strategy seam: how replicas combine their work, as seen by the one trainer loop.

Dean et al. (2012) and the overview (Arnold, 2016, sections 3-4) describe every data-parallel method as
the same worker loop -- read a mini-batch, compute a gradient, combine with the others, update -- with the
methods differing only in *how and when* they combine. :func:`distlearn.train.train` owns the loop; a
:class:`Strategy` owns the combining. Adding a method (``sync``, ``ps``, ``hogwild``, ``local-sgd``,
``easgd``, ``dni``) is one file in this package with one subclass.

Contract (what the loop calls, in order)::

    strategy.place(device)                         # --device (trainer) or the model's (parallelize)
    strategy.setup(seed)                           # join the job (process group, roles); idempotent
    model, optimizer = strategy.prepare(model, optimizer)   # e.g. broadcast rank 0's weights
    for epoch ...:
        for indices in strategy.batches(n, global_batch=B, seed=s, epoch=e, start_step=k):
            loss = loss_fn(model(x[indices]), y[indices]); loss.backward()
            strategy.before_step(model, optimizer, step)  # between backward and optimizer step:
                                                            # sync allreduces gradients, ps pushes/pulls
            clip; optimizer.step(); scheduler.step()
            strategy.after_step(model, optimizer, step)   # local SGD averages every k steps, EASGD pulls
            record(strategy.stats())                      # bytes_sent, staleness for the metrics
        evaluate strategy.evaluation_model(model) where strategy.evaluates
    strategy.close()

Rules every strategy keeps:

* ``rank``, ``world_size``, ``role`` describe this process; ``is_main`` (rank 0) alone writes progress,
  summaries and checkpoints. ``role`` is ``"worker"`` for a replica that trains, otherwise e.g.
  ``"server"``; processes whose ``trains`` is false run :meth:`serve` instead of the loop.
* The global batch ``B`` is fixed (the overview's scaling rule): each of the ``R`` training replicas sees
  ``M = B / R`` examples per step (:meth:`local_batch`), and the union over replicas of one step's
  batches is the single-process batch of that step. ``B`` must be divisible by ``R``.
* Collectives and connections carry timeouts; a dead peer raises :class:`distlearn.errors.CommError`.
* **The device.** Whoever drives the strategy calls :meth:`place` before :meth:`setup`: the trainer with
  ``--device`` (``auto``, ``cpu``, ``cuda``), :func:`distlearn.parallelize` with the model's device (or its
  ``device=``). It resolves the device of this process (:func:`distlearn.devices.resolve_device`:
  ``cuda:LOCAL_RANK``) and keeps it in :attr:`device`; :meth:`setup` joins the job on
  :attr:`backend` (NCCL for a CUDA device, gloo for the CPU: :meth:`join_job`), and :meth:`prepare` receives
  the model and optimizer already on :attr:`device`, so collectives work on the device's tensors. A
  strategy that cannot compute on CUDA says why in its options' :meth:`StrategyOptions.cuda_refusal`:
  ``--device cuda`` is then refused before any process starts (:meth:`StrategyOptions.check`) and
  ``auto`` means the CPU. A strategy whose ranks may share a GPU (the parameter server: its servers stay
  on the CPU) sets :attr:`Strategy.shares_device`.
* :meth:`state_dict` / :meth:`load_state_dict` hold whatever the strategy must resume exactly
  (error-feedback residuals, step counters); they go into the checkpoint and may hold only tensors and
  plain Python values (checkpoints load with ``weights_only=True``).

The single-process strategy (:mod:`distlearn.parallel.single`) is this base class with ``R = 1``: every
hook is the identity, which is why the loop is the same code with or without distribution.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypedDict

import torch
from torch import nn

from distlearn.comm.groups import wait_within
from distlearn.comm.replicas import check_same_model
from distlearn.config import check_type, positive
from distlearn.devices import backend_for, resolve_device
from distlearn.errors import CommError, ConfigError

__all__ = [
    "Strategy",
    "StrategyOptions",
    "StrategyStats",
    "check_global_batch",
    "epoch_batches",
    "make_options",
    "option_names",
]


@dataclass
class StrategyOptions:
    """The options every strategy has; each strategy's own options dataclass derives from it.

    Every field is a ``distlearn train --flag`` (underscores as dashes), a key of the strategy's section in a
    config file (``[sync]``) and a keyword of :func:`distlearn.parallelize`, all generated from the
    dataclass. Field checks run in :meth:`validate` (at construction, so before any process starts);
    checks that need the run's other options (optimizer) in :meth:`check`, and those that need the job's
    size (the global batch over :meth:`batch_takers`, roles such as servers) in :meth:`check_job`. A
    strategy whose ``replicas`` are not all its ranks overrides :meth:`batch_takers`.
    """

    comm_timeout: float = 300.0
    """seconds before a stuck collective or dead peer ends the job"""

    aliases: ClassVar[dict[str, str]] = {"timeout_s": "comm_timeout"}
    """Older keyword names (of the strategies' constructors and ``parallelize()``) -> field names."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError for a field value that no run can use, naming the flag and the fix."""
        positive("comm_timeout", self.comm_timeout)

    def check(self, run: Any) -> None:
        """ConfigError for a combination with the run's common options (``run``: a TrainConfig).

        The base check refuses ``--device cuda`` for options whose :meth:`cuda_refusal` says why.
        """
        if getattr(run, "device", "auto") == "cuda" and self.cuda_refusal():
            raise ConfigError(f"--device cuda: {self.cuda_refusal()}")

    def cuda_refusal(self) -> str:
        """Why these options cannot compute on a CUDA device, and what to use instead ("" when they can)."""
        return ""

    def batch_takers(self, processes: int) -> int:
        """How many ranks of a job of ``processes`` split the global batch ``B`` (default: every rank)."""
        return processes

    def check_job(self, run: Any, processes: int) -> None:
        """ConfigError for a combination with the job's size: ``processes`` ranks in all (the world size).

        Run before any process starts (:func:`distlearn.train.config.validate_config`, with
        :meth:`Strategy.processes`), and in each worker with its world size; a strategy whose ranks have
        roles (servers, a centre) checks here that every role is filled.
        """
        check_global_batch(run.batch_size, self.batch_takers(processes))

    def idle_ranks(self, processes: int) -> tuple[int, ...]:
        """The ranks of a job of ``processes`` that run no training steps (servers, a centre): a straggler
        there would slow nothing, so ``--straggler`` refuses them (default: none)."""
        return ()


def option_names(options_class: type) -> list[str]:
    """The field names of an options dataclass (its flags without the dashes)."""
    return [f.name for f in dataclasses.fields(options_class)]


def make_options(
    options_class: type, options: Any = None, fields: dict[str, Any] | None = None, *, source: str = ""
) -> Any:
    """An ``options_class`` instance from ``options`` (an instance or None) and keyword ``fields``.

    Keywords may use the older names of :attr:`StrategyOptions.aliases`; a mapping given for a
    ``tuple[str, ...]`` field becomes ``KEY=VALUE`` strings (``compression_options={"density": 0.01}``).
    Unknown keywords raise ConfigError naming the known ones, a value of the wrong type one naming the key,
    the value and the type expected (``source``: where the values come from, for the message).
    """
    fields = dict(fields or {})
    if options is not None and not isinstance(options, options_class):
        raise ConfigError(
            f"options of type {type(options).__name__} given where {options_class.__name__} is expected"
        )
    known = option_names(options_class)
    aliases = getattr(options_class, "aliases", {})
    hints = typing.get_type_hints(options_class)
    values: dict[str, Any] = {}
    for key, value in fields.items():
        name = aliases.get(key, key)
        if name not in known:
            raise ConfigError(
                f"unknown option {key!r} for {options_class.__name__}; known options: {', '.join(known)}"
            )
        if value is None and typing.get_origin(hints[name]) is tuple:
            continue  # (compression_options=None: none, the field's default)
        if isinstance(value, dict) and typing.get_origin(hints[name]) is tuple:
            value = tuple(f"{k}={v!r}" for k, v in value.items())
        check_type(name, value, hints[name], source or options_class.__name__)
        values[name] = value
    if options is None:
        return options_class(**values)
    return dataclasses.replace(options, **values) if values else options


class StrategyStats(TypedDict, total=False):
    """What a strategy reports for the metrics (see :mod:`distlearn.metrics` for units)."""

    bytes_sent: int
    """Payload bytes this process has sent since :meth:`Strategy.setup` (cumulative)."""
    bytes_received: int
    """Payload bytes this process has received (cumulative)."""
    staleness: float
    """Mean staleness of the gradients applied since the last call, in parameter versions (async only)."""


def check_global_batch(global_batch: int, replicas: int, who: str = "replicas") -> None:
    """ConfigError unless ``global_batch`` splits evenly over ``replicas``, naming the nearest that do."""
    if replicas < 1:
        raise ConfigError(f"no {who} share the batch (got {replicas}); start more processes (--workers)")
    if global_batch >= 1 and global_batch % replicas == 0:
        return
    lower, upper = (global_batch // replicas) * replicas, (global_batch // replicas + 1) * replicas
    nearest = f"{lower} or {upper}" if lower >= replicas else f"{upper}"
    raise ConfigError(
        f"--batch-size {global_batch} is not divisible by the {replicas} {who} that share it (each takes "
        f"B / {replicas} examples per step); use --batch-size {nearest}"
    )


def epoch_batches(
    n: int,
    *,
    global_batch: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> Iterator[torch.Tensor]:
    """This replica's index batches for one epoch: a seeded permutation cut into global batches.

    The permutation depends only on ``(seed, epoch)``, so every replica agrees on it without talking and
    a resumed run regenerates it exactly; step ``t`` of the epoch uses positions ``[t*B, (t+1)*B)`` of
    it, of which replica ``r`` takes the contiguous slice ``[r*M, (r+1)*M)`` (``M = B / R``). The last
    incomplete global batch is dropped so every step has the same size.
    """
    if global_batch % world_size:
        raise ConfigError(
            f"global batch {global_batch} is not divisible by {world_size} replicas; "
            f"use a multiple of {world_size} for --batch-size"
        )
    local = global_batch // world_size
    steps = n // global_batch
    if steps == 0:
        raise ConfigError(
            f"global batch {global_batch} is larger than the {n} training examples; lower --batch-size"
        )
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    for step in range(start_step, steps):
        start = step * global_batch + rank * local
        yield order[start : start + local]


class Strategy:
    """Base class and documentation of the strategy contract; its defaults are the single-process case.

    Subclasses override the hooks they need and set ``name``. All hooks receive the objects returned by
    :meth:`prepare`.
    """

    name: str = "base"
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    """The strategy's typed options (a :class:`StrategyOptions` dataclass declared beside it)."""
    amp_modes: ClassVar[tuple[str, ...]] = ("none", "bf16", "fp16")
    """The ``--amp`` modes the strategy supports (:mod:`distlearn.amp`); fp16 needs one that lets a step be
    skipped alike on every replica."""
    launcher: ClassVar[str] = "torchrun"
    """How ``distlearn train`` starts the job's processes: ``"torchrun"`` (one process per rank, also on
    many machines), ``"ranks"`` (one plain process per rank on this machine, with the failure policy of
    :meth:`rank_policy` instead of torchrun's stop-everything: :mod:`distlearn.ranklaunch`) or ``"pool"``
    (a local process pool sharing memory: :meth:`launch`)."""
    shares_device: ClassVar[bool] = False
    """True when several local ranks may share one GPU (``cuda:(LOCAL_RANK mod GPUs)``) because only some of
    them compute on it; otherwise each local rank needs a GPU of its own."""

    @classmethod
    def processes(cls, options: StrategyOptions, run: Any) -> int:
        """How many processes the job runs (default ``--workers``)."""
        return int(run.workers)

    @classmethod
    def rank_policy(cls, options: StrategyOptions, run: Any) -> Any:
        """A ``"ranks"`` strategy's :class:`distlearn.ranklaunch.RankPolicy`: which ranks' failure ends the
        job, which must succeed (None for the other launchers)."""
        return None

    @classmethod
    def launch(cls, run: Any, train: Any) -> Any:
        """Start a ``"pool"`` strategy's processes, each running ``train(run, strategy=...)``."""
        raise NotImplementedError(f"strategy {cls.name!r} is started by torchrun, not by a process pool")

    def __init__(self, options: StrategyOptions | None = None, /, *, run: Any = None, **fields: Any) -> None:
        """``options`` (or keyword ``fields`` of :attr:`Options`); ``run``: the run's common options.

        ``run`` is a :class:`distlearn.train.TrainConfig` when the trainer builds the strategy (the
        parameter server reads the optimizer from it, DNI the data and model); None in a user's own loop.
        """
        if options is None and isinstance(getattr(run, "options", None), type(self).Options):
            options = run.options  # the run's config carries this strategy's options
        self.options = make_options(type(self).Options, options, fields)
        if run is not None:
            self.options.check(run)
        self.run = run
        self.timeout_s = self.options.comm_timeout
        self.rank = 0
        self.world_size = 1
        self.role = "worker"
        self.device = torch.device("cpu")
        """Where this process computes: set by :meth:`place` before :meth:`setup` (the CPU until then)."""

    # -- who am I ---------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on the process that does the job's I/O (progress bar, summary, checkpoints)."""
        return self.rank == 0

    @property
    def trains(self) -> bool:
        """True when this process runs the training loop (false for e.g. a parameter server)."""
        return self.role == "worker"

    @property
    def evaluates(self) -> bool:
        """True when this process evaluates on the test set and writes eval records (default: main)."""
        return self.is_main

    @property
    def replicas(self) -> int:
        """Number of training replicas ``R`` that share the global batch (default: ``world_size``)."""
        return self.world_size

    @property
    def replica_index(self) -> int:
        """This process's position among the training replicas, in ``[0, replicas)``."""
        return self.rank

    # -- life cycle -------------------------------------------------------------------------------------
    def place(self, spec: str | torch.device | None) -> torch.device:
        """Choose this process's device from ``spec`` and keep it in :attr:`device` (before :meth:`setup`).

        ``spec`` is ``--device`` (``"auto"``, ``"cpu"``, ``"cuda"``) or a ``torch.device``; ``"auto"`` is
        the CPU for options that refuse CUDA (:meth:`StrategyOptions.cuda_refusal`), and CUDA for them is
        a ConfigError saying why.
        """
        refusal = self.options.cuda_refusal()
        if refusal and str(spec).startswith("cuda"):
            raise ConfigError(f"--device cuda: {refusal}")
        if refusal and spec in (None, "auto"):
            spec = "cpu"
        self.device = resolve_device(spec, shared=self.shares_device)
        return self.device

    @property
    def backend(self) -> str:
        """The c10d backend of this strategy's process group: NCCL on a CUDA device, gloo on the CPU."""
        return backend_for(self.device)

    def setup(self, seed: int) -> None:
        """Join the job (process group, roles). Called once, before the model is built."""

    def join_job(self, usage: str, timeout_s: float) -> bool:
        """Join the torchrun job once: sets ``rank``, ``world_size``, ``_context`` and ``_owns_group``.

        Returns False when this strategy has joined already. Outside torchrun, with no process group, a
        ConfigError says ``"the <name> strategy <usage>"`` (how to start it). The group's backend is
        :attr:`backend`; on CUDA :attr:`device` becomes the current device first (NCCL's rule).
        """
        from distlearn.launch import in_torchrun, init_distributed

        if getattr(self, "_context", None) is not None:
            return False
        already = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not already and not in_torchrun():
            raise ConfigError(f"the {self.name} strategy {usage}")
        self._context = init_distributed(self.backend, timeout_s=timeout_s, device=self.device)
        self._owns_group = not already
        self.rank, self.world_size = self._context.rank, self._context.world_size
        self.check_same_options()
        return True

    def check_same_options(self) -> None:
        """ConfigError on every rank when the ranks were started with different options, naming them
        (:mod:`distlearn.parallel.agree`); called once the group is joined, before any other collective.
        A group this strategy created is left again before the error goes up."""
        from distlearn.launch import shutdown
        from distlearn.parallel.agree import check_same_options

        try:
            check_same_options(
                self.run, self.options, rank=self.rank, world_size=self.world_size, timeout_s=self.timeout_s
            )
        except (ConfigError, CommError):
            if getattr(self, "_owns_group", False):
                shutdown()
                self._owns_group = False
                self._context = None
            raise

    def _wait(self, work: Any, what: str) -> None:
        """Wait for ``work`` within ``self.timeout_s``, else a CommError naming the rank and ``what``."""
        wait_within(work, self.timeout_s, rank=self.rank, what=what)

    def start_from_rank0(self, model: nn.Module) -> None:
        """Check that every rank built the same model, then give every rank rank 0's weights and buffers."""
        check_same_model(model, self.rank, self.world_size)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                work = torch.distributed.broadcast(tensor.data, src=0, async_op=True)
                self._wait(work, "broadcast of rank 0's weights")

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Make replicas start alike and wrap what needs wrapping; returns the pair the loop will use."""
        return model, optimizer

    def serve(self) -> None:
        """The whole life of a non-training process (``trains`` false), e.g. a parameter server."""
        raise NotImplementedError(f"strategy {self.name!r} has no serving role")

    def barrier(self) -> None:
        """Wait for every process of the job (a no-op with one process)."""

    def close(self) -> None:
        """Leave the job and free its resources; must be safe to call twice."""

    # -- data -------------------------------------------------------------------------------------------
    def local_batch(self, global_batch: int) -> int:
        """Examples per step on this replica, ``M = B / R``."""
        check_global_batch(global_batch, self.replicas)
        return global_batch // self.replicas

    def steps_per_epoch(self, n: int, global_batch: int) -> int:
        """Optimizer steps in one pass over ``n`` examples (incomplete last batch dropped)."""
        return n // global_batch

    def batches(
        self, n: int, *, global_batch: int, seed: int, epoch: int, start_step: int = 0
    ) -> Iterator[torch.Tensor]:
        """This replica's index tensors for ``epoch`` from step ``start_step`` on (:func:`epoch_batches`)."""
        return epoch_batches(
            n,
            global_batch=global_batch,
            seed=seed,
            epoch=epoch,
            rank=self.replica_index,
            world_size=self.replicas,
            start_step=start_step,
        )

    # -- the step ---------------------------------------------------------------------------------------
    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Between ``loss.backward()`` and ``optimizer.step()``: combine gradients (sync, ps push/pull)."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After ``optimizer.step()``: combine parameters (local SGD averaging, EASGD's elastic pull)."""

    def waits_for_all(self, step: int) -> bool:
        """True when step ``step`` (just taken) made every replica wait for every other (an allreduce): the
        simulated clock then takes the slowest replica's (:mod:`distlearn.train.straggler`). Default False:
        each process keeps its own clock."""
        return False

    def use_grad_scaler(self, scaler: Any) -> None:
        """Told once after :meth:`prepare` of the fp16 loss scaler (a ``torch.amp.GradScaler``; None without
        one). The default does nothing: gradients combined by dense sums carry one rank's inf or NaN to every
        rank, so the scaler skips the step alike everywhere. The sync strategy with a codec unscales before
        encoding and agrees on skips (:class:`distlearn.amp.LossScaleGuard`)."""

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The model the test accuracy is reported for (e.g. EASGD's centre variable)."""
        return model

    # -- metrics and checkpoints ------------------------------------------------------------------------
    def stats(self) -> StrategyStats:
        """Communication counters for the metrics; empty when the strategy does not communicate."""
        return {}

    def run_summary(self) -> dict[str, Any]:
        """Fields this strategy adds to the run's summary (printed table and summary record), e.g. the
        parameter server's staleness; plain values only."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Strategy state needed to resume exactly (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"strategy {self.name!r} has no state but the checkpoint holds {sorted(state)}")

    def describe(self) -> str:
        """One line for the run summary."""
        return f"{self.name} (rank {self.rank} of {self.world_size}, {self.role})"
