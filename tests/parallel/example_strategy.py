"""An example strategy in one file: data parallelism with one allreduce per gradient tensor.

This is the file docs/architecture.md shows under "adding a strategy". It needs nothing else from the rest
of distlearn but the Strategy contract: ``distlearn train``, a config file and ``distlearn.parallelize()``
all reach it by its import path (``--strategy example_strategy:TensorAllreduce``), or, once it is copied
into ``src/distlearn/parallel/``, by its name after one line in :data:`distlearn.parallel.STRATEGIES`:
``"tensor-allreduce": "distlearn.parallel.<file>:TensorAllreduce"``.

The algorithm is synchronous SGD without buckets or overlap (Arnold, 2016, section 3): after backward,
every replica replaces each gradient ``g_r`` by ``(1 / R) sum_r g_r`` (one blocking allreduce per tensor),
so every replica takes the same step; with the same seed it ends bitwise equal to ``--strategy sync``
(tests/parallel/test_example_strategy.py checks it). ``scale`` multiplies the averaged gradient (1: the
mean; an option only to show how a strategy declares one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn.config import positive
from distlearn.launch import shutdown
from distlearn.parallel.base import Strategy, StrategyOptions, StrategyStats

__all__ = ["TensorAllreduce", "TensorAllreduceOptions"]


@dataclass
class TensorAllreduceOptions(StrategyOptions):
    """Options of the per-tensor allreduce strategy."""

    scale: float = 1.0
    """factor applied to the averaged gradient (1: the plain mean)"""

    def validate(self) -> None:
        super().validate()
        positive("scale", self.scale)


class TensorAllreduce(Strategy):
    """One process per replica; every gradient tensor averaged by its own allreduce before the step."""

    name = "tensor-allreduce"
    Options = TensorAllreduceOptions

    def __init__(self, options: TensorAllreduceOptions | None = None, /, *, run: Any = None, **fields: Any):
        super().__init__(options, run=run, **fields)
        self.bytes_sent = 0
        self._owns_group = False

    def setup(self, seed: int) -> None:
        usage = "runs one process per replica: use --workers N, or start the job with torchrun"
        self.join_job(usage, self.timeout_s)

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.start_from_rank0(model)  # same architecture everywhere, then rank 0's weights
        return model, optimizer

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        for parameter in model.parameters():
            if parameter.grad is None:
                continue
            work = dist.all_reduce(parameter.grad, async_op=True)
            self._wait(work, f"allreduce of a gradient at step {step}")
            parameter.grad.div_(self.world_size).mul_(self.options.scale)
            self.bytes_sent += parameter.grad.numel() * parameter.grad.element_size()

    def barrier(self) -> None:
        if self.world_size > 1:
            self._wait(dist.barrier(async_op=True), "barrier")

    def close(self) -> None:
        if self._owns_group:
            shutdown()
            self._owns_group = False

    def stats(self) -> StrategyStats:
        return {"bytes_sent": self.bytes_sent}

    def describe(self) -> str:
        return f"tensor-allreduce ({self.world_size} replicas, scale {self.options.scale:g})"
