"""The learning-rate schedule: warm-up, then constant, step decay or cosine, through ``LambdaLR``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LRSchedule", "make_scheduler", "resume_lr"]


@dataclass
class LRSchedule:
    """Learning-rate multiplier ``f(t)`` of optimizer step ``t`` (0-based), used through ``LambdaLR``.

    Warm-up (Goyal et al., 2017, "Accurate, large minibatch SGD"): ``f(t) = (t + 1) / W`` for ``t < W``.
    After it, with ``s = t - W`` and ``T = total - W`` steps left:

    * ``constant``: ``f = 1``;
    * ``step``: ``f = gamma ** floor(s / every)``;
    * ``cosine`` (Loshchilov and Hutter, 2017, SGDR without restarts):
      ``f = m + (1 - m) * (1 + cos(pi * min(s, T) / T)) / 2``, from 1 down to ``m = min_factor``.

    A plain-valued object (not a lambda) so ``LambdaLR.state_dict()`` stores it and checkpoints stay
    ``weights_only``-loadable.
    """

    kind: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    decay_every: int = 0
    decay_factor: float = 0.1
    min_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        since = step - self.warmup_steps
        if self.kind == "step":
            return self.decay_factor ** (since // self.decay_every)
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(since, span) / span
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" and self.warmup_steps == 0


# -- validation --------------------------------------------------------------------------------------------


def make_scheduler(config: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """``LambdaLR`` over :class:`LRSchedule` of the run's settings; None for a constant rate."""
    schedule = LRSchedule(
        kind=config.schedule,
        total_steps=total_steps,
        warmup_steps=config.warmup_steps,
        decay_every=config.lr_decay_every,
        decay_factor=config.lr_decay_factor,
        min_factor=config.min_lr_factor,
    )
    return None if schedule.is_constant else torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def resume_lr(
    optimizer: torch.optim.Optimizer, scheduler: Any, lr: float | None, saved: float | None
) -> None:
    """After a resume: ``--lr`` given and unlike the checkpoint's run's (``saved``) becomes the peak rate.

    ``load_state_dict`` brought back the checkpoint's rates; each group's rate (and the schedule's base) is
    scaled by ``lr / saved``, the schedule's position kept, so a run that diverged can continue from its last
    good checkpoint with a lower ``--lr``. Nothing changes when ``lr`` is None or equal to ``saved``.
    """
    if lr is None or lr == saved:
        return
    for index, group in enumerate(optimizer.param_groups):
        base = group.get("initial_lr", group["lr"])
        new_base = lr if saved is None else base * lr / saved
        if scheduler is not None:
            scheduler.base_lrs[index] = new_base
            group["initial_lr"] = new_base
            group["lr"] = new_base * scheduler.lr_lambdas[index](scheduler.last_epoch)
        else:
            group["lr"] = new_base
