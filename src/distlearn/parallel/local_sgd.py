"""Local SGD and post-local SGD: replicas step on their own and average their parameters every ``k`` steps.

Local SGD (Stich, 2019, "Local SGD converges fast and communicates little"; the overview's "k local steps"):
``R`` replicas start from the same weights ``w``; replica ``r`` takes ``k`` optimizer steps on its own
shard of each global batch (``M = B / R`` examples per step), and then every replica replaces its weights
by the mean ::

    w_r <- w_r - eta * u(g_r)                       every step, locally (any optimizer u)
    w_r <- (1 / R) * sum_{r'} w_{r'}                after every k-th step (one allreduce of the weights)

With ``k = 1`` and plain SGD this is exactly synchronous SGD with the global batch, because the mean of
``w - eta * g_r`` is ``w - eta * mean(g_r)`` (tests/parallel/test_local_sgd.py checks it against the sync
strategy). With ``k > 1`` it sends ``k`` times fewer messages; the price is that replicas drift apart
between averages.

Post-local SGD (Lin, Stich, Patel & Jaggi, 2020, "Don't use large mini-batches, use local SGD"): the first
``W`` steps are synchronous SGD (gradients allreduced every step, so replicas stay identical), and local SGD
with period ``k`` only starts afterwards, when the early, large-gradient phase of training is over.

Implementation: torch's own
:class:`torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager` does the averaging
(``average_parameters`` after each optimizer step). *Where we differ from torch's
example:* its averager averages after the first post-warm-up step and then every ``k``; we construct it with
``warmup_steps = W + k - 1`` so that each average comes after ``k`` full local steps (after steps
``W + k, W + 2k, ...``, counting from 1), and the warm-up's gradient averaging is done here (one flat
allreduce per step) instead of by a DDP communication hook. Optimizer state (momentum buffers, Adam's
moments) stays local and is not averaged, as in Lin et al.; module buffers (BatchNorm statistics) are not
averaged either. Evaluation (rank 0) uses rank 0's replica, which is the average right after each
averaging step: choose ``--eval-every`` as a multiple of ``k`` to evaluate averaged weights.

Run it::

    distlearn train --strategy local-sgd --workers 2 --average-every 4 --post-local-warmup 200

Tuning: ``k = 4 .. 16`` keeps accuracy close to sync SGD on small networks; a warm-up of a few hundred
steps (or one epoch) helps when the learning rate is large at the start.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from distlearn.comm.traffic import ring_allreduce_bytes
from distlearn.config import positive
from distlearn.errors import CommError
from distlearn.launch import DistContext, shutdown
from distlearn.parallel.base import Strategy, StrategyOptions, StrategyStats

__all__ = ["LocalSGD"]


@dataclass
class LocalSGDOptions(StrategyOptions):
    """Options of local SGD (``--strategy local-sgd``)."""

    average_every: int = 4
    """k, local steps between two parameter averages"""
    post_local_warmup: int = 0
    """synchronous steps before local SGD starts (post-local SGD)"""

    aliases: ClassVar[dict[str, str]] = {
        **StrategyOptions.aliases,
        "period": "average_every",
        "warmup_steps": "post_local_warmup",
    }

    def validate(self) -> None:
        super().validate()
        positive("average_every", self.average_every, integer=True)
        positive("post_local_warmup", self.post_local_warmup, allow_zero=True, integer=True)


class LocalSGD(Strategy):
    """Local SGD with period ``k`` and an optional synchronous warm-up of ``W`` steps (post-local SGD).

    Options: :class:`LocalSGDOptions`: ``average_every`` (``k >= 1``, local steps between two parameter
    averages) and ``post_local_warmup`` (``W``, synchronous-SGD steps before local SGD starts).

    Example (in a torchrun worker)::

        strategy = LocalSGD(average_every=4)
        result = train(TrainConfig(strategy="local-sgd", optimizer="sgd", lr=0.05), strategy=strategy)
    """

    name = "local-sgd"

    Options = LocalSGDOptions

    def __init__(self, options: LocalSGDOptions | None = None, /, *, run: Any = None, **fields: Any) -> None:
        super().__init__(options, run=run, **fields)
        self.period = self.options.average_every
        self.warmup_steps = self.options.post_local_warmup
        self.averager: PeriodicModelAverager | None = None
        self.bytes_sent = 0
        self.averages = 0
        self._params: list[torch.Tensor] = []
        self._context: DistContext | None = None
        self._owns_group = False
        self._restored_step: int | None = None
        self._waited = False

    # -- life cycle ---------------------------------------------------------------------------------------

    def setup(self, seed: int) -> None:
        usage = (
            "runs one process per replica: use `distlearn train --strategy local-sgd "
            "--workers N`, or start the job with torchrun"
        )
        if not self.join_job(usage, self.timeout_s):
            return

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.start_from_rank0(model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        # torch warns that k = 1 is better served by DDP; here k = 1 is the equivalence test
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.averager = PeriodicModelAverager(
                period=self.period, warmup_steps=self.warmup_steps + self.period - 1
            )
        if self._restored_step is not None:
            self.averager.step = self._restored_step
        return model, optimizer

    def barrier(self) -> None:
        if self._context is not None and self.world_size > 1:
            self._wait(dist.barrier(async_op=True), "barrier")

    def close(self) -> None:
        if self._owns_group:
            shutdown()
            self._owns_group = False
        self._context = None

    # -- the step -----------------------------------------------------------------------------------------

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """During the post-local warm-up (``step < W``): replace each gradient by the replicas' mean."""
        if step >= self.warmup_steps or self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._wait(dist.all_reduce(flat, async_op=True), "gradient allreduce (post-local warm-up)")
        flat.div_(self.world_size)
        self.bytes_sent += ring_allreduce_bytes(flat.numel(), flat.element_size(), self.world_size)
        offset = 0
        for p in self._params:
            n = p.numel()
            if p.grad is None:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            else:
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Let torch's averager average the parameters when ``k`` local steps have passed."""
        assert self.averager is not None, "prepare() must run before the first step"
        averager = self.averager
        due = (
            averager.step >= averager.warmup_steps
            and (averager.step - averager.warmup_steps) % averager.period == 0
        )
        self._waited = self.world_size > 1 and (due or step < self.warmup_steps)
        if due and self.world_size > 1:
            # torch's averager allreduces the parameters as one flat tensor: counted as gloo's ring
            numel = sum(p.numel() for p in self._params)
            size = self._params[0].element_size() if self._params else 4
            self.bytes_sent += ring_allreduce_bytes(numel, size, self.world_size)
            self.averages += 1
        try:
            averager.average_parameters(self._params)
        except RuntimeError as error:  # gloo reports a dead peer or a timeout as RuntimeError
            raise CommError(
                f"rank {self.rank}: parameter averaging at step {step + 1} failed ({error}); "
                "a peer may have died"
            ) from error

    def waits_for_all(self, step: int) -> bool:
        return self._waited  # an averaging (or a warm-up allreduce) this step

    # -- metrics and checkpoints --------------------------------------------------------------------------

    def stats(self) -> StrategyStats:
        return {"bytes_sent": self.bytes_sent}

    def state_dict(self) -> dict[str, Any]:
        step = self.averager.step if self.averager is not None else 0
        return {"averager_step": int(step), "bytes_sent": self.bytes_sent, "averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._restored_step = int(state["averager_step"])
        if self.averager is not None:
            self.averager.step = self._restored_step
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.averages = int(state.get("averages", 0))

    def describe(self) -> str:
        warmup = f", post-local after {self.warmup_steps} sync steps" if self.warmup_steps else ""
        done = f"{self.averages} averages"
        return f"local-sgd ({self.world_size} replicas, average every {self.period} steps{warmup}, {done})"
