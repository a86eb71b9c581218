"""Synchronous data-parallel SGD: every replica takes the same step with the gradient of the global batch.

The overview's synchronous distributed SGD (Arnold, 2016, section 3; Dean et al., 2012): ``R`` replicas
start from the same weights; at step ``t`` replica ``r`` computes the gradient ``g_r`` of its shard of the
global batch ``B`` (``M = B / R`` examples, :meth:`Strategy.batches`); an allreduce gives every replica

    g = (1 / R) * sum_r g_r

which, because the loss is a mean over the batch and the shards are equal, is exactly the gradient of the
whole global batch; every replica then applies the same optimizer update. With a fixed global batch the
run therefore follows the single-process trajectory (up to floating-point summation order), whatever
``R`` is -- the overview's "deterministic" property, which tests/parallel/test_sync.py checks.

Communication: gradients are packed into buckets and reduced by a :class:`distlearn.comm.reducers.Reducer`
(the backend's allreduce, or our ring, tree, Rabenseifner or segmented ring), each bucket started from
the gradient hooks as soon as backward has produced it (:mod:`distlearn.comm.bucketing`).

Compression: with ``compression=NAME`` (``--compression``) every bucket is sent through a gradient codec of
:mod:`distlearn.comm.compression` instead of the reducer -- allreduced in compressed form where the codec
is linear (fp16/bf16 casts, random-k, PowerSGD), all-gathered as packed payloads otherwise -- and each
replica then holds the same (lossy) average; the codec's residuals go into the checkpoint.

Run it with ``distlearn train --strategy sync --workers 2`` (one machine) or under ``torchrun`` on several.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn.comm.bucketing import GradientBucketer
from distlearn.errors import CommError, ConfigError
from distlearn.launch import DistContext, shutdown
from distlearn.parallel.base import Strategy, StrategyStats

__all__ = [
    "SyncDataParallel",
    "check_no_optimizer_momentum",
    "check_same_model",
    "compression_options_of",
    "weights_checksum",
]


def check_no_optimizer_momentum(codec: str, optimizer: torch.optim.Optimizer) -> None:
    """Deprecated, for train.py's validation until it calls :func:`distlearn.comm.compression.check_optimizer`
    (the one check, given the codec object): ConfigError if ``optimizer`` keeps momentum or moment
    estimates, for the codec named ``codec`` that applies momentum."""
    from distlearn.comm.compression.memory import refuse_optimizer_momentum

    refuse_optimizer_momentum(codec, optimizer)


def compression_options_of(config: Any) -> dict[str, Any]:
    """A TrainConfig's codec options: ``--compression-option KEY=VALUE``, ``--density``, ``--rank``."""
    from distlearn.train import parse_options

    options = parse_options(tuple(getattr(config, "compression_option", ()) or ()))
    for name in ("density", "rank"):
        value = getattr(config, name, None)
        if value is not None:
            if name in options and options[name] != value:
                raise ConfigError(
                    f"--{name} {value} and --compression-option {name}={options[name]} disagree"
                )
            options[name] = value
    return options


def _describe_model(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]


def check_same_model(model: nn.Module, rank: int, world_size: int) -> None:
    """Raise ConfigError on every rank if any rank's parameters differ in names, shapes or dtypes."""
    mine = _describe_model(model)
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    for other_rank, theirs in enumerate(everyone):
        if theirs == mine:
            continue
        count = (len(mine), sum(torch.Size(s).numel() for _, s, _ in mine))
        other = (len(theirs), sum(torch.Size(s).numel() for _, s, _ in theirs))
        first = next(
            (f"{a} vs {b}" for a, b in zip(mine, theirs, strict=False) if a != b),
            "one model has extra parameters",
        )
        raise ConfigError(
            f"rank {rank} and rank {other_rank} hold different models ({count[0]} tensors / {count[1]:,} "
            f"parameters vs {other[0]} / {other[1]:,}; first difference: {first}); every worker must "
            "build the same architecture -- check --model and the dataset's shape on every machine"
        )


def weights_checksum(model: nn.Module) -> torch.Tensor:
    """Two float64 numbers that change if any weight changes: sum and a position-weighted sum."""
    total = torch.zeros(2, dtype=torch.float64)
    offset = 0
    for p in model.parameters():
        flat = p.detach().reshape(-1).double()
        weights = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64)
        total[0] += flat.sum()
        total[1] += (flat * weights).sum()
        offset += flat.numel()
    return total


class SyncDataParallel(Strategy):
    """Synchronous data parallelism with a fixed global batch, over ``torch.distributed``.

    Args:
        reducer: allreduce algorithm: ``"backend"`` (gloo's/NCCL's own), ``"ring"``, ``"tree"``,
            ``"rabenseifner"`` or ``"segmented-ring"`` (:mod:`distlearn.comm.reducers`).
        bucket_mb: bucket capacity in MiB (DDP's default 25); 0 sends one message per parameter.
        overlap: start each bucket's allreduce during backward (default on).
        check_every: every N steps, verify that all replicas hold identical weights (0: never).
        timeout_s: deadline of every collective; a peer that dies or stalls raises CommError.
        compression: a codec name of :data:`distlearn.comm.compression.COMPRESSORS`, or ``"none"``.
        compression_options: the codec's keyword options (e.g. ``{"density": 0.001}``, ``{"rank": 2}``).

    Rules: rank 0's initial weights are broadcast to every rank in :meth:`prepare`, after checking that
    all ranks built the same model; the global batch must be divisible by the world size.
    """

    name = "sync"

    def __init__(
        self,
        *,
        reducer: str = "backend",
        bucket_mb: float = 25.0,
        overlap: bool = True,
        check_every: int = 0,
        timeout_s: float = 300.0,
        compression: str = "none",
        compression_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if bucket_mb < 0:
            raise ConfigError(f"--bucket-mb must be >= 0, got {bucket_mb}; 25 is DDP's default")
        if check_every < 0:
            raise ConfigError(f"--check-every must be >= 0, got {check_every}")
        if timeout_s <= 0:
            raise ConfigError(f"--comm-timeout must be positive, got {timeout_s}")
        from distlearn.comm.reducers import create_reducer

        self.reducer_name = reducer
        self._create_reducer = create_reducer
        create_reducer(reducer)  # validates the name before any process group exists
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.overlap = overlap
        self.check_every = check_every
        self.timeout_s = timeout_s
        self.reducer: Any = None
        self.bucketer: GradientBucketer | None = None
        self._context: DistContext | None = None
        self._owns_group = False
        self.compressor: Any = None
        if compression != "none":
            from distlearn.comm.compression import create_compressor

            if reducer != "backend":
                raise ConfigError(
                    f"--reducer {reducer} cannot be combined with --compression {compression}: a codec "
                    "chooses its own exchange (allreduce of linear payloads, all-gather of packed ones) and "
                    "replaces the allreduce algorithm; drop --reducer"
                )
            self.compressor = create_compressor(compression, **(compression_options or {}))
        elif compression_options:
            raise ConfigError(
                f"compression options {sorted(compression_options)} given without --compression"
            )

    @classmethod
    def from_config(cls, config: Any) -> SyncDataParallel:
        return cls(
            reducer=config.reducer,
            bucket_mb=config.bucket_mb,
            overlap=config.overlap,
            check_every=config.check_every,
            timeout_s=config.comm_timeout,
            compression=getattr(config, "compression", "none"),
            compression_options=compression_options_of(config),
        )

    # -- life cycle ---------------------------------------------------------------------------------------

    def setup(self, seed: int) -> None:
        usage = (
            "runs one process per replica: use `distlearn train --strategy sync --workers N`, "
            "or start the job with torchrun"
        )
        if not self.join_job(usage, self.timeout_s):
            return
        if self.compressor is not None:
            from distlearn.comm.compression import CompressedReducer

            self.reducer = CompressedReducer(self.compressor, seed=seed, timeout_s=self.timeout_s)
        else:
            self.reducer = self._create_reducer(self.reducer_name, timeout_s=self.timeout_s)

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.start_from_rank0(model)
        self.bucketer = GradientBucketer(
            model.parameters(),
            self.reducer,
            world_size=self.world_size,
            bucket_bytes=self.bucket_bytes,
            overlap=self.overlap,
        )
        if self.compressor is not None:
            self._check_compression(optimizer)
            for bucket in self.bucketer.buckets:
                shapes = [tuple(p.shape) for p in bucket.params]
                self.reducer.register(bucket.buffer, str(bucket.index), shapes)
        return model, optimizer

    def _check_compression(self, optimizer: torch.optim.Optimizer) -> None:
        """ConfigError if the codec cannot serve this model and optimizer, saying why."""
        name = self.compressor.name
        assert self.bucketer is not None
        for bucket in self.bucketer.buckets:
            if bucket.buffer.dtype != torch.float32:
                raise ConfigError(
                    f"--compression {name} encodes float32 gradients, but a bucket holds "
                    f"{bucket.buffer.dtype}; "
                    "train in float32 or drop --compression"
                )
        from distlearn.comm.compression import check_optimizer

        check_optimizer(self.compressor, optimizer)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"compression": self.compressor.state_dict()} if self.compressor is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.compressor is None:
            if state:
                raise ConfigError(
                    f"the checkpoint holds {sorted(state)} state of a compressed run; resume with the same "
                    "--compression"
                )
            return
        if "compression" not in state:
            raise ConfigError(
                f"the checkpoint has no compression state; it was not written by a --compression "
                f"{self.compressor.name} run"
            )
        self.compressor.load_state_dict(state["compression"])

    def barrier(self) -> None:
        if self._context is not None and self.world_size > 1:
            self._wait(dist.barrier(async_op=True), "barrier")

    def close(self) -> None:
        if self.bucketer is not None:
            self.bucketer.close()
            self.bucketer = None
        if self.reducer is not None and hasattr(self.reducer, "close"):
            self.reducer.close()
        if self._owns_group:
            shutdown()
            self._owns_group = False
        self._context = None

    # -- the step -----------------------------------------------------------------------------------------

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        assert self.bucketer is not None, "prepare() must run before the first step"
        self.bucketer.finish()

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.check_every and (step + 1) % self.check_every == 0:
            self.check_replicas(model, step + 1)

    def check_replicas(self, model: nn.Module, step: int) -> None:
        """Raise CommError if the replicas' weights differ (compares a checksum across ranks)."""
        mine = weights_checksum(model)
        lowest, highest = mine.clone(), mine.clone()
        self._wait(dist.all_reduce(lowest, op=dist.ReduceOp.MIN, async_op=True), "weights check")
        self._wait(dist.all_reduce(highest, op=dist.ReduceOp.MAX, async_op=True), "weights check")
        if not torch.equal(lowest, highest):
            raise CommError(
                f"replicas diverged at step {step}: weight checksums range over {lowest.tolist()} .. "
                f"{highest.tolist()} (rank {self.rank} has {mine.tolist()}); a non-deterministic op or a "
                "rank-dependent code path changed the weights -- file a bug with the command you ran"
            )

    # -- reporting ----------------------------------------------------------------------------------------

    def stats(self) -> StrategyStats:
        return {"bytes_sent": int(getattr(self.reducer, "bytes_sent", 0))}

    def describe(self) -> str:
        buckets = self.bucketer.describe() if self.bucketer is not None else "no buckets yet"
        exchange = (
            f"{self.compressor.describe()} compression"
            if self.compressor is not None
            else f"{self.reducer_name} allreduce"
        )
        return f"sync ({self.world_size} replicas, {exchange}, {buckets})"
