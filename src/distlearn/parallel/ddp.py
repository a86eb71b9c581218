"""torch's own DistributedDataParallel as a strategy: the reference every sync variant is measured against.

``distlearn train --strategy ddp --workers R`` wraps the model in
``torch.nn.parallel.DistributedDataParallel`` (its own bucketing, overlap and gloo/NCCL allreduce; on
``--device cuda`` NCCL, with ``device_ids=[cuda:LOCAL_RANK]`` as DDP expects) and
otherwise runs the same loop, data shards and metrics as every other strategy, so ``distlearn bench``
compares ``sync`` and DDP on exactly the same work. Nothing here is ours but the wiring, and with
``--comm-hook NAME`` one of our reducers as DDP's comm hook
(:func:`distlearn.comm.ddp_hooks.as_ddp_comm_hook`: DDP's buckets and overlap, our allreduce; ``auto``: shm
on the CPU of a one-host job, else DDP's own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distlearn.comm.ddp_hooks import as_ddp_comm_hook
from distlearn.comm.reducers import create_reducer
from distlearn.comm.reducers.auto import AUTO, resolve_reducer
from distlearn.comm.traffic import ring_allreduce_bytes
from distlearn.config import positive
from distlearn.errors import ConfigError
from distlearn.launch import in_torchrun, init_distributed, shutdown
from distlearn.parallel.base import Strategy, StrategyOptions, StrategyStats

__all__ = ["DDPOptions", "TorchDDP"]


@dataclass
class DDPOptions(StrategyOptions):
    """Options of torch's DistributedDataParallel (``--strategy ddp``), the reference."""

    bucket_mb: float = 25.0
    """gradient bucket size in MiB (DDP's bucket_cap_mb; its default is 25)"""
    comm_hook: str = "none"
    """a distlearn reducer as DDP's comm hook (ring, tree, shm, hierarchical, auto, ...; none: DDP's own
    allreduce)"""

    def validate(self) -> None:
        super().validate()
        positive("bucket_mb", self.bucket_mb, allow_zero=True)
        if self.comm_hook not in ("none", AUTO):
            create_reducer(self.comm_hook)  # validates the name before any process group exists

    def cuda_refusal(self) -> str:
        if self.comm_hook in ("shm", "hierarchical"):
            return (
                f"--comm-hook {self.comm_hook} moves CPU tensors through shared memory (/dev/shm); on GPUs "
                "drop --comm-hook (NCCL's allreduce) or use auto, or train with --device cpu"
            )
        return ""


class TorchDDP(Strategy):
    """``torch.nn.parallel.DistributedDataParallel`` with ``bucket_cap_mb`` (DDP's default 25 MiB)."""

    name = "ddp"

    Options = DDPOptions

    def __init__(self, options: DDPOptions | None = None, /, *, run: Any = None, **fields: Any) -> None:
        super().__init__(options, run=run, **fields)
        self.bucket_mb = self.options.bucket_mb
        self.comm_hook = self.options.comm_hook
        self.reducer: Any = None
        self._owns_group = False
        self._parameters = (0, 4)  # (elements, bytes per element) of the trained parameters

    def setup(self, seed: int) -> None:
        already = dist.is_available() and dist.is_initialized()
        if not already and not in_torchrun():
            raise ConfigError("the ddp strategy runs one process per replica: use `--workers N` or torchrun")
        context = init_distributed(self.backend, timeout_s=self.timeout_s, device=self.device)
        self._owns_group = not already
        self.rank, self.world_size = context.rank, context.world_size
        self.check_same_options()

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        trained = [p for p in model.parameters() if p.requires_grad]
        self._parameters = (sum(p.numel() for p in trained), trained[0].element_size() if trained else 4)
        self._steps = 0
        # DDP's rule for one device per process: the module on it already, and device_ids=[it] on CUDA
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.bucket_mb)
        hook = resolve_reducer(self.comm_hook, self.device) if self.comm_hook != "none" else "none"
        if hook not in ("none", "backend"):  # our reducer inside DDP's bucketing and overlap
            self.comm_hook = hook
            self.reducer = create_reducer(hook, timeout_s=self.timeout_s)
            wrapped.register_comm_hook(state=None, hook=as_ddp_comm_hook(self.reducer))
        return wrapped, optimizer

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._steps += 1

    def waits_for_all(self, step: int) -> bool:
        return self.world_size > 1  # every backward allreduces the gradients

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The module inside the DDP wrapper: only rank 0 evaluates, and DDP's forward is a collective
        (it broadcasts buffers such as BatchNorm statistics), which would wait for the other ranks."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def stats(self) -> StrategyStats:
        if self.reducer is not None:  # our comm hook counts what it sends
            return {"bytes_sent": int(self.reducer.bytes_sent)}
        # DDP does not count its traffic; gloo's ring sends 2(R-1)/R of the gradient bytes per step.
        per_step = ring_allreduce_bytes(*self._parameters, self.world_size)
        return {"bytes_sent": per_step * self._steps}

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None
        if self._owns_group:
            shutdown()
            self._owns_group = False

    def describe(self) -> str:
        hook = f", {self.comm_hook} comm hook" if self.comm_hook != "none" else ""
        return f"torch DDP ({self.world_size} replicas, {self.bucket_mb:g} MiB buckets{hook})"
