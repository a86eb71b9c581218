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
(the backend's allreduce, or our ring, tree, Rabenseifner or segmented ring, the shared-memory reducer of one
host or the hierarchical one of several; ``auto`` picks shm on the CPU of a one-host job, else the backend:
:mod:`distlearn.comm.reducers.auto`), each bucket started from the gradient hooks as soon as backward has
produced it (:mod:`distlearn.comm.bucketing`).

Compression: with ``compression=NAME`` (``--compression``) every bucket is sent through a gradient codec of
:mod:`distlearn.comm.compression` instead of the reducer -- allreduced in compressed form where the codec
is linear (fp16/bf16 casts, random-k, PowerSGD), all-gathered as packed payloads otherwise -- and each
replica then holds the same (lossy) average; the codec's residuals go into the checkpoint.

Run it with ``distlearn train --strategy sync --workers 2`` (one machine) or under ``torchrun`` on several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distlearn import optim
from distlearn.amp import LossScaleGuard
from distlearn.comm.bucketing import GradientBucketer
from distlearn.comm.compression import CompressedReducer, check_optimizer, create_compressor
from distlearn.comm.reducers import create_reducer
from distlearn.comm.reducers.auto import AUTO, resolve_reducer
from distlearn.comm.replicas import check_same_model, nonfinite_weights_error, weights_checksum
from distlearn.config import flag, parse_options, positive
from distlearn.errors import CommError, ConfigError
from distlearn.launch import DistContext, shutdown
from distlearn.parallel.base import Strategy, StrategyOptions, StrategyStats

__all__ = [
    "CompressionOptions",
    "SyncDataParallel",
    "SyncOptions",
    "check_same_model",
    "compression_options_of",
    "weights_checksum",
]


@dataclass
class CompressionOptions(StrategyOptions):
    """The gradient codec's options, shared by the strategies that send gradients (sync, ps)."""

    compression: str = "none"
    """gradient codec: none, fp16, bf16, int8-linear, int8-tree, threshold, onebit, terngrad, qsgd, topk,
    randomk, dgc, powersgd (distlearn.comm.compression)"""
    compression_option: tuple[str, ...] = ()
    """codec options as KEY=VALUE, e.g. threshold=0.01 levels=4 warmup_steps=200"""
    density: float | None = None
    """topk/randomk/dgc: fraction of gradient elements sent, (0, 1]"""
    rank: int | None = None
    """powersgd: approximation rank r >= 1"""

    aliases: ClassVar[dict[str, str]] = {
        **StrategyOptions.aliases,
        "compression_options": "compression_option",
    }

    def validate(self) -> None:
        super().validate()
        given = [name for name in ("density", "rank") if getattr(self, name) is not None]
        if self.compression == "none":
            if given or self.compression_option:
                flags = [flag(name) for name in given]
                flags += ["--compression-option"] * bool(self.compression_option)
                raise ConfigError(
                    f"{', '.join(flags)} only apply with --compression NAME (e.g. --compression topk)"
                )
            return
        create_compressor(self.compression, **self.codec_options())  # the name and every option

    def codec_options(self) -> dict[str, Any]:
        """The codec's keyword options: ``--compression-option KEY=VALUE``, ``--density``, ``--rank``."""
        options = parse_options(self.compression_option, "compression")
        for name in ("density", "rank"):
            value = getattr(self, name)
            if value is not None:
                if name in options and options[name] != value:
                    raise ConfigError(
                        f"--{name} {value} and --compression-option {name}={options[name]} disagree"
                    )
                options[name] = value
        return options

    def check(self, run: Any) -> None:
        super().check(run)
        if self.compression == "none" or run is None:
            return
        # A codec that applies momentum refuses an optimizer with momentum: say so before any worker starts.
        probe = [torch.zeros(1, requires_grad=True)]
        optimizer = optim.create(run.optimizer, probe, lr=run.lr, **parse_options(run.optimizer_option))
        check_optimizer(create_compressor(self.compression, **self.codec_options()), optimizer)


def compression_options_of(options: CompressionOptions) -> dict[str, Any]:
    """The codec's keyword options of ``options`` (:meth:`CompressionOptions.codec_options`)."""
    return options.codec_options()


@dataclass
class SyncOptions(CompressionOptions):
    """Options of synchronous data parallelism (``--strategy sync``)."""

    reducer: str = "auto"
    """allreduce algorithm: backend, ring, tree, rabenseifner, segmented-ring, shm (shared memory, every rank
    on one host), hierarchical (shm within each host, ring across hosts), auto (shm on the CPU of a one-host
    job, else backend)"""
    bucket_mb: float = 25.0
    """gradient bucket size in MiB (0: one message per tensor); DDP's default is 25"""
    overlap: bool = True
    """start each bucket's allreduce during backward"""
    check_every: int = 0
    """verify every N steps that replicas hold identical weights (0: never)"""

    def validate(self) -> None:
        super().validate()
        positive("bucket_mb", self.bucket_mb, allow_zero=True)
        positive("check_every", self.check_every, allow_zero=True, integer=True)
        if self.reducer != AUTO:
            create_reducer(self.reducer)  # validates the name before any process group exists
        if self.compression != "none" and self.reducer not in ("backend", AUTO):
            raise ConfigError(
                f"--reducer {self.reducer} cannot be combined with --compression {self.compression}: a codec "
                "chooses its own exchange (allreduce of linear payloads, all-gather of packed ones) and "
                "replaces the allreduce algorithm; drop --reducer"
            )

    def cuda_refusal(self) -> str:
        if self.reducer in ("shm", "hierarchical"):
            return (
                f"--reducer {self.reducer} moves CPU tensors through shared memory (/dev/shm); on GPUs use "
                "--reducer backend (NCCL's allreduce) or auto, or train with --device cpu"
            )
        return ""


class SyncDataParallel(Strategy):
    """Synchronous data parallelism with a fixed global batch, over ``torch.distributed``.

    Options: :class:`SyncOptions` (the reducer, buckets, overlap, replica checks and the codec of
    :class:`CompressionOptions`), e.g. ``SyncDataParallel(reducer="ring", bucket_mb=5)``.

    Rules: rank 0's initial weights are broadcast to every rank in :meth:`prepare`, after checking that
    all ranks built the same model; the global batch must be divisible by the world size.
    """

    name = "sync"
    Options = SyncOptions

    def __init__(self, options: SyncOptions | None = None, /, *, run: Any = None, **fields: Any) -> None:
        super().__init__(options, run=run, **fields)
        o = self.options
        self.reducer_name = o.reducer
        self.bucket_bytes = int(o.bucket_mb * 2**20)
        self.overlap = o.overlap
        self.check_every = o.check_every
        self.reducer: Any = None
        self.bucketer: GradientBucketer | None = None
        self._context: DistContext | None = None
        self._owns_group = False
        self.compressor: Any = None
        if o.compression != "none":
            self.compressor = create_compressor(o.compression, **o.codec_options())

    # -- life cycle ---------------------------------------------------------------------------------------

    def setup(self, seed: int) -> None:
        usage = (
            "runs one process per replica: use `distlearn train --strategy sync --workers N`, "
            "or start the job with torchrun"
        )
        if not self.join_job(usage, self.timeout_s):
            return
        if self.compressor is not None:
            self.reducer = CompressedReducer(self.compressor, seed=seed, timeout_s=self.timeout_s)
        else:
            self.reducer_name = resolve_reducer(self.reducer_name, self.device)  # "auto": shm or backend
            self.reducer = create_reducer(self.reducer_name, timeout_s=self.timeout_s)

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

    def use_grad_scaler(self, scaler: Any) -> None:
        """With a codec, the bucketer unscales each bucket before encoding and the ranks agree on skipped
        steps (:class:`distlearn.amp.LossScaleGuard`); without one, torch's own recipe needs nothing."""
        assert self.bucketer is not None, "prepare() must run before use_grad_scaler()"
        guarded = scaler is not None and self.compressor is not None
        guard = LossScaleGuard(scaler, self.reducer, timeout_s=self.timeout_s) if guarded else None
        self.bucketer.scaling = guard

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.check_every and (step + 1) % self.check_every == 0:
            self.check_replicas(model, step + 1)

    def waits_for_all(self, step: int) -> bool:
        return self.world_size > 1  # every step allreduces the gradients

    def check_replicas(self, model: nn.Module, step: int) -> None:
        """Raise CommError if the replicas' weights differ (compares a checksum across ranks), and
        DivergenceError if any rank's weights are not finite."""
        mine = weights_checksum(model)
        finite = bool(torch.isfinite(mine).all())  # the third entry: 1 where a rank's weights are not finite
        lowest = torch.cat([mine.nan_to_num(0.0, 0.0, 0.0), torch.tensor([0.0 if finite else 1.0]).double()])
        highest = lowest.clone()
        self._wait(dist.all_reduce(lowest, op=dist.ReduceOp.MIN, async_op=True), "weights check")
        self._wait(dist.all_reduce(highest, op=dist.ReduceOp.MAX, async_op=True), "weights check")
        if highest[2] > 0:  # NaN weights: training diverged, which is no disagreement between replicas
            raise nonfinite_weights_error(step, self.rank, finite, self.run)
        lowest, highest = lowest[:2], highest[:2]
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
