"""Hogwild!: R processes on one machine update one copy of the weights in shared memory, without locks.

Niu, Recht, Re & Wright (2011), "HOGWILD!: A lock-free approach to parallelizing stochastic gradient
descent". Every process ``r`` loops, with no coordination at all ::

    read the shared weights w (whatever mix of other processes' updates they hold at that moment)
    g_r = gradient of the loss on its own mini-batch at what it read
    w <- w - eta * u_r(g_r)        written in place, element by element, into the shared memory

The paper proves near-linear speed-up for sparse problems, where two updates rarely touch the same
coordinates; for a dense network every update touches every weight, overwrites are possible and the method
behaves like asynchronous SGD with a staleness of about ``R - 1`` updates (see docs/async.md).

What is shared and what is not:

* **shared**: the parameters -- one flat ``float32`` buffer in shared memory (``Tensor.share_memory_()``,
  handed to the other processes through a ``torch.multiprocessing`` queue); each process's
  ``nn.Parameter`` s are views into it, so an optimizer step in one process is seen by every other.
* **per process**: gradients (``.grad``), optimizer state (momentum buffers, Adam's moments), module buffers
  (BatchNorm statistics), the data shard (replica ``r`` takes slice ``r`` of each global batch, so per
  epoch the shards are disjoint and cover the data), RNG streams and metrics files.

Single machine by nature: the processes are started by ``torch.multiprocessing`` (``spawn``) from the
``distlearn train`` process, not by torchrun -- ``--workers R`` counts them. Process 0 creates the shared
buffer from its freshly initialised model and puts it on the queue once per other process; the others wait
for it with a deadline, replace their parameters by views of it, and everyone meets at a barrier (with a
timeout) before the first step and after the last. The processes are a :class:`distlearn.pool.ProcessPool`:
bounded by a deadline, stopped together when one fails (the error names it, with its traceback), on SIGTERM
or Ctrl-C, so no process outlives the run. Each runs the trainer it is given (``launch_hogwild(config,
train=train)``): this module never imports distlearn.train.

*Where we differ:* the paper's processes sample single examples; ours take mini-batches of ``M = B / R``
examples per update (``--batch-size`` is the global batch ``B``), and the update may be any optimizer, each
process with its own state.

**Buckwild!** (``--buckwild``; De Sa, Zhang, Olukotun & Re, "Taming the Wild: A Unified Analysis of
Hogwild!-Style Algorithms", NeurIPS 2015): the shared weights are 8-bit fixed point, ``w = s_k * q`` with
``q`` an ``int8`` in ``[-127, 127]`` and one fixed scale ``s_k`` per tensor (``s_k = max(4 max|w0_k|,
0.05) / 127``, from the initial weights, so the grid covers four times their range). Each process keeps a
float copy to compute with: it reads ``q`` into it, takes an optimizer step, and adds its update to the
shared codes with *unbiased stochastic rounding*, ``q <- clip(q + floor(dw / s_k + u), -127, 127)`` with
``u ~ U[0, 1)`` (so ``E[s_k * rounded] = dw``: updates smaller than one grid step still move the weights
on average, the paper's point), lock-free like Hogwild!; then it reads ``q`` again for its next step.
Shared memory per weight: 1 byte instead of 4. Saturated elements (the clip) are counted
(``Hogwild.saturated``).

Run it::

    distlearn train --strategy hogwild --workers 2 --optimizer sgd --lr 0.05 --threads 1
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distlearn.errors import CommError, ConfigError
from distlearn.parallel.base import Strategy, StrategyOptions
from distlearn.pool import ProcessPool, spawn_context

__all__ = ["Hogwild", "HogwildChannel", "launch_hogwild", "share_parameters", "stochastic_round"]

BUCKWILD_RANGE = 4.0
"""Buckwild!'s grid covers this many times each tensor's largest initial magnitude."""
BUCKWILD_MIN_RANGE = 0.05
"""... and at least this much (a tensor initialised at 0, e.g. a bias, still gets a usable grid)."""


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(x + u)``, ``u ~ U[0, 1)`` elementwise: an integer-valued tensor with ``E[result] = x``."""
    return torch.floor(x + torch.rand(x.shape, generator=generator, dtype=x.dtype))


@dataclass
class HogwildChannel:
    """What the launcher hands to every process: a queue for the shared buffer and a barrier."""

    buffers: Any  # torch.multiprocessing Queue: process 0 puts the shared flat buffer once per peer
    barrier: Any  # multiprocessing Barrier(R) for the start and the end


def share_parameters(parameters: list[torch.Tensor], flat: torch.Tensor | None = None) -> torch.Tensor:
    """Point every parameter at a view of one flat shared-memory buffer and return the buffer.

    Without ``flat`` a new shared buffer is made from the parameters' current values; with it (a buffer
    received from another process) the parameters take its values. The optimizer keeps working on the same
    ``nn.Parameter`` objects: only their storage changes.
    """
    total = sum(p.numel() for p in parameters)
    if flat is None:
        flat = torch.cat([p.detach().reshape(-1).float() for p in parameters]).share_memory_()
    elif flat.numel() != total:
        raise ConfigError(
            f"the shared weights hold {flat.numel()} numbers but this process's model has {total}: every "
            "Hogwild process must build the same --model"
        )
    offset = 0
    for p in parameters:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


@dataclass
class HogwildOptions(StrategyOptions):
    """Options of Hogwild! (``--strategy hogwild``): processes of one machine sharing the weights."""

    buckwild: bool = False
    """8-bit shared weights with unbiased stochastic rounding (Buckwild!)"""

    def cuda_refusal(self) -> str:
        return (
            "Hogwild!'s processes update one copy of the weights in shared CPU memory "
            "(Tensor.share_memory_), which a GPU's memory cannot be; it runs on the CPU: use --device cpu "
            "(or auto), or --strategy sync / ddp to train on GPUs"
        )


class Hogwild(Strategy):
    """Lock-free shared-memory SGD (see the module docstring). One instance per process.

    Options: :class:`HogwildOptions` (``buckwild``; ``comm_timeout`` bounds receiving the shared buffer
    and each barrier). The launcher gives each process its place:

        rank: this process's index ``r`` in ``[0, R)``.
        world_size: ``R``, the number of processes sharing the weights.
        channel: the launcher's :class:`HogwildChannel` (needed when ``R > 1``).
    """

    name = "hogwild"
    Options = HogwildOptions
    launcher = "pool"

    @classmethod
    def launch(cls, run: Any, train: Any) -> dict[int, dict[str, Any]]:
        """``run.workers`` processes sharing the weights, each running ``train`` (:func:`launch_hogwild`)."""
        return launch_hogwild(run, train=train)

    def __init__(
        self,
        options: HogwildOptions | None = None,
        /,
        *,
        run: Any = None,
        rank: int = 0,
        world_size: int = 1,
        channel: HogwildChannel | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(options, run=run, **fields)
        if run is not None and run.workers > 1:  # the launcher builds each process's strategy without run
            raise ConfigError(
                "hogwild processes share memory, so they are started by `distlearn train --strategy hogwild "
                f"--workers {run.workers}` (torch.multiprocessing), not by torchrun or train() directly"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"hogwild process {rank} of {world_size} is not a valid place in the job")
        if world_size > 1 and channel is None:
            raise ConfigError(
                "hogwild with several processes needs the launcher's shared channel: run it with "
                "`distlearn train --strategy hogwild --workers R` (or parallel.hogwild.launch_hogwild)"
            )
        self.rank, self.world_size = rank, world_size
        self.channel = channel
        self.shared: torch.Tensor | None = None
        self.buckwild = self.options.buckwild
        self.scales: torch.Tensor | None = None  # Buckwild!: one per tensor (shared, fixed)
        self._parameters: list[torch.Tensor] = []
        self._scale_per_element: torch.Tensor | None = None
        self._read: torch.Tensor | None = None  # Buckwild!: the float weights this process last read
        self._generator = torch.Generator().manual_seed(1_000_003 * (rank + 1))
        self.saturated = 0

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        parameters = [p for p in model.parameters() if p.requires_grad]
        if self.buckwild:
            return self._prepare_buckwild(parameters, model, optimizer)
        if self.world_size == 1:
            self.shared = share_parameters(parameters)
            return model, optimizer
        assert self.channel is not None
        if self.rank == 0:
            self.shared = share_parameters(parameters)
            for _ in range(self.world_size - 1):
                self.channel.buffers.put(self.shared)
        else:
            try:
                flat = self.channel.buffers.get(timeout=self.timeout_s)
            except queue.Empty:
                raise CommError(
                    f"hogwild process {self.rank}: no shared weights from process 0 "
                    f"within {self.timeout_s:g} s"
                ) from None
            self.shared = share_parameters(parameters, flat)
        self.barrier()  # process 0 must stay alive until every peer has mapped the buffer
        return model, optimizer

    # -- Buckwild! ------------------------------------------------------------------------------------------

    def _prepare_buckwild(
        self, parameters: list[torch.Tensor], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._parameters = parameters
        sizes = torch.tensor([p.numel() for p in parameters])
        if self.rank == 0:
            with torch.no_grad():
                ranges = torch.stack([p.detach().abs().max().float() for p in parameters])
                scales = (ranges * BUCKWILD_RANGE).clamp_min(BUCKWILD_MIN_RANGE) / 127
                flat = torch.cat([p.detach().reshape(-1).float() for p in parameters])
                per_element = torch.repeat_interleave(scales, sizes)
                codes = stochastic_round(flat / per_element, self._generator).clamp_(-127, 127)
            self.shared = codes.to(torch.int8).share_memory_()
            self.scales = scales.share_memory_()
            if self.world_size > 1:
                assert self.channel is not None
                for _ in range(self.world_size - 1):
                    self.channel.buffers.put((self.shared, self.scales))
        else:
            assert self.channel is not None
            try:
                self.shared, self.scales = self.channel.buffers.get(timeout=self.timeout_s)
            except queue.Empty:
                raise CommError(
                    f"buckwild process {self.rank}: no shared weights from process 0 "
                    f"within {self.timeout_s:g} s"
                ) from None
            if self.shared.numel() != int(sizes.sum()) or self.scales.numel() != len(parameters):
                raise ConfigError(
                    f"the shared 8-bit weights hold {self.shared.numel()} numbers in {self.scales.numel()} "
                    f"tensors but this process's model has {int(sizes.sum())} in {len(parameters)}: every "
                    "Hogwild process must build the same --model"
                )
        self._scale_per_element = torch.repeat_interleave(self.scales, sizes)
        self._read_shared()
        self.barrier()
        return model, optimizer

    @torch.no_grad()
    def _read_shared(self) -> None:
        """Copy ``s * q`` into this process's float parameters and remember what was read."""
        assert self.shared is not None and self._scale_per_element is not None
        self._read = self.shared.to(torch.float32).mul_(self._scale_per_element)
        offset = 0
        for p in self._parameters:
            p.copy_(self._read[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Buckwild!: add this step's update to the shared codes (stochastic rounding), then read them."""
        if not self.buckwild:
            return
        assert self.shared is not None and self._read is not None and self._scale_per_element is not None
        now = torch.cat([p.detach().reshape(-1).float() for p in self._parameters])
        steps = stochastic_round(now.sub_(self._read).div_(self._scale_per_element), self._generator)
        total = self.shared.to(torch.int16).add_(steps.to(torch.int16))  # a racy read-modify-write, by design
        self.saturated += int((total.abs() > 127).sum())
        self.shared.copy_(total.clamp_(-127, 127))
        self._read_shared()

    def barrier(self) -> None:
        if self.world_size > 1 and self.channel is not None:
            try:
                self.channel.barrier.wait(timeout=self.timeout_s)
            except threading.BrokenBarrierError:
                raise CommError(
                    f"hogwild process {self.rank}: the other processes did not reach the barrier within "
                    f"{self.timeout_s:g} s; one has probably died (see its error above)"
                ) from None
        if self.buckwild and self._read is not None:
            self._read_shared()  # after the last step every process ends with the shared 8-bit model

    def describe(self) -> str:
        weights = "8-bit weights, Buckwild!" if self.buckwild else "one copy of the weights"
        return f"hogwild ({self.world_size} processes sharing {weights}; process {self.rank})"


# -- the launcher -----------------------------------------------------------------------------------------


def _worker(
    rank: int, train: Callable[..., Any], config: Any, world_size: int, channel: HogwildChannel
) -> dict[str, Any]:
    """Process ``rank`` of the pool: train with :class:`Hogwild` through ``train``; return its summary."""
    strategy = Hogwild(config.options, rank=rank, world_size=world_size, channel=channel)
    try:
        result = train(config, strategy=strategy)
    except BaseException:
        channel.barrier.abort()  # wake the others at once instead of letting them wait for the timeout
        raise
    summary = {key: value for key, value in result.summary.items() if isinstance(value, (int, float, str))}
    summary["weights_checksum"] = float(sum(p.detach().double().sum() for p in result.model.parameters()))
    return {"samples_per_s": result.samples_per_s, "train_seconds": result.train_seconds,
            "test_accuracy": result.test_accuracy, **summary}  # fmt: skip


def launch_hogwild(
    config: Any, *, train: Callable[..., Any], timeout_s: float | None = None
) -> dict[int, dict[str, Any]]:
    """Run ``config.workers`` Hogwild processes (a :class:`distlearn.pool.ProcessPool`) and return their
    summaries by rank.

    Each process calls ``train(config, strategy=Hogwild(...))``: the trainer, :func:`distlearn.train.train`,
    passed in by the caller (a strategy does not import the trainer); a module-level function, as the
    processes are spawned. Threads per process: ``config.threads`` or the machine's cores divided among the
    processes. Within ``timeout_s`` (default none) every process must finish; when one fails
    (:class:`distlearn.pool.WorkerError`, naming it, with its traceback) or the deadline passes
    (:class:`distlearn.pool.PoolTimeout`), the others are stopped; both are ``CommError``.
    """
    world_size = config.workers
    if config.threads is None:
        config = dataclasses.replace(config, threads=max(1, (os.cpu_count() or 1) // world_size))
    context = spawn_context()
    channel = HogwildChannel(buffers=context.Queue(), barrier=context.Barrier(world_size))
    try:
        with ProcessPool(_worker, world_size, (train, config, world_size, channel), name="hogwild") as pool:
            summaries = pool.wait(timeout_s)
    finally:
        channel.buffers.close()
    return dict(enumerate(summaries))
