"""The divergence guard: a run whose loss, gradients or weights stop being finite, or whose loss explodes,
ends with a :class:`distlearn.errors.DivergenceError` instead of training on NaN and exiting 0.

What it checks, and when:

* every step, the loss is kept as a tensor (no host synchronisation: ``observe`` appends it to a list);
* at every boundary -- a training record (``--log-every``), an evaluation, a checkpoint, the run's end --
  the losses since the previous boundary are stacked and checked at once (one synchronisation), and so are
  the weights (one sum per parameter). A non-finite loss names its exact step; non-finite weights with
  finite losses (the last step's gradients overflowed) name the parameters and the steps between the two
  boundaries. The mean loss since the previous boundary above ``--max-loss-factor`` times the run's first
  loss (at least 1.0) is an explosion: Adam at ``--lr 1e6`` keeps a finite loss of 1e21;
* a checkpoint is written only after its boundary check, so a diverged state never replaces the last good
  checkpoint, and the error names that checkpoint and the ``--resume`` that continues from it.

``--on-nonfinite skip`` instead checks the loss and the combined gradients of every step before the
optimizer's step (one synchronisation per step) and drops a non-finite step: gradients zeroed, no update,
the step counted in the summary's ``skipped_steps``; :data:`MAX_SKIPS_IN_A_ROW` skipped steps in a row stop
the run as above. In a synchronous job the gradients checked are the allreduced ones, the same on every
rank, so every rank drops the same steps. A loss scaler (mixed precision with a ``GradScaler``) decides
skipping itself: code that uses one sets :attr:`DivergenceGuard.scaler_decides` and calls
:meth:`DivergenceGuard.note_skipped` for each step the scaler dropped; the guard then checks only the loss
and the weights.

In a job of several processes every rank checks its own replica at the same boundaries. Synchronous
strategies allreduce the gradients, so a non-finite value on one rank is non-finite on every rank and all
of them stop at the same step; with local SGD, EASGD or a parameter server each worker checks its own, and
the erroring process's exit ends the job (torchrun stops the others).

Cost (measured with ``benchmarks/divergence_guard.py``, one process, MLP on 28x28 inputs, batch 128, 200
steps, guard on and off interleaved): see docs/reliability.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.checkpoint import restart_advice
from distlearn.errors import ConfigError, DivergenceError

__all__ = ["MAX_SKIPS_IN_A_ROW", "DivergenceGuard"]

MAX_SKIPS_IN_A_ROW = 25
"""``--on-nonfinite skip``: this many non-finite steps in a row stop the run (skipping cannot recover)."""


def _names(found: list[str]) -> str:
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


class DivergenceGuard:
    """Checks one replica's training for divergence (the module docstring says what and when).

    Args:
        config: the run's :class:`distlearn.train.TrainConfig` (``on_nonfinite``, ``max_loss_factor``,
            ``lr``, ``optimizer``, ``clip_grad_norm``, ``out``, ``checkpoints``).
        closure: the optimizer re-evaluates the loss (CG, L-BFGS): its step cannot be skipped.
        rank, world_size: this process's place in the job (named in the message when it has several).
    """

    def __init__(self, config: Any, closure: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.mode: str = getattr(config, "on_nonfinite", "stop")
        self.factor: float = getattr(config, "max_loss_factor", 0.0) or 0.0
        if self.mode == "skip" and closure:
            raise ConfigError(
                f"--on-nonfinite skip cannot drop a step of --optimizer {config.optimizer}, which evaluates "
                "the loss inside its own step; use --on-nonfinite stop (the default)"
            )
        self.prefix = f"rank {rank}: " if world_size > 1 else ""
        self.losses: list[torch.Tensor] = []  # this replica's losses since the previous boundary
        self.first_step = 0  # the step whose loss is losses[0] (steps counted from 1)
        self.checked_at = -1  # the step of the previous boundary check
        self.reference: float | None = None  # the run's first loss (this process's)
        self.skipped = 0
        self.skipped_in_a_row = 0
        self.skipped_last = False
        self.scaler_decides = False
        """Set by code that steps through a ``GradScaler``: the scaler drops non-finite steps, not this."""

    # -- every step ---------------------------------------------------------------------------------------

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Keep the loss of ``step`` (counted from 0) for the next boundary check; no synchronisation."""
        if not self.losses:
            self.first_step = step + 1
        self.losses.append(loss.detach().reshape(()))

    def step_allowed(
        self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, step: int
    ) -> bool:
        """Called after the gradients are combined, before ``optimizer.step()``: False drops the step.

        ``stop`` (and a scaler deciding): keep the loss, True. ``skip``: check the loss and every gradient
        now; a non-finite one zeroes the gradients and returns False.
        """
        self.skipped_last = False
        if self.mode == "stop" or self.scaler_decides:
            self.observe(loss, step)
            return True
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        sums = [g.detach().sum().float().reshape(()) for g in grads]  # non-finite if an entry is
        if bool(torch.isfinite(torch.stack([loss.detach().float().reshape(()), *sums])).all()):
            self.observe(loss, step)
            self.skipped_in_a_row = 0
            return True
        self.note_skipped(step, model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        return False

    def note_skipped(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Count ``step`` (from 0) as dropped; too many in a row raise :class:`DivergenceError`."""
        self.skipped += 1
        self.skipped_in_a_row += 1
        self.skipped_last = True
        if self.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            found = self._bad_gradients(model)
            where = f" (non-finite gradient in {_names(found)})" if found else ""
            raise self._error(
                f"training diverged: the last {self.skipped_in_a_row} steps up to step {step + 1} all had a "
                f"non-finite loss or gradient{where} and were skipped",
                optimizer,
            )

    # -- at a boundary ------------------------------------------------------------------------------------

    def check(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Raise :class:`DivergenceError` if a loss since the previous check, or a weight now, is not
        finite, or the loss exploded. Cheap when called twice at one step (the second does nothing)."""
        if step == self.checked_at:
            return
        since = self.checked_at
        self.checked_at = step
        losses, self.losses = self.losses, []
        if losses:
            values = torch.stack(losses).float()
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                index = int((~finite).nonzero()[0])
                grads = self._bad_gradients(model)
                where = f"; non-finite gradient in {_names(grads)}" if grads else ""
                raise self._error(
                    f"training diverged at step {self.first_step + index}: the training loss is "
                    f"{values[index].item()}{where}",
                    optimizer,
                )
        weights = self._bad_weights(model)
        if weights:
            grads = self._bad_gradients(model)
            where = f" (non-finite gradient in {_names(grads)} at step {step})" if grads else ""
            first = max(since, 0) + 1
            when = f"at step {step}" if first >= step else f"between step {first} and step {step}"
            raise self._error(
                f"training diverged {when}: non-finite weights in {_names(weights)}{where}",
                optimizer,
            )
        if losses:
            if self.reference is None:
                self.reference = float(values[0])
            mean = float(values.mean())
            limit = self.factor * max(abs(self.reference), 1.0)
            if self.factor and mean > limit:
                raise self._error(
                    f"training diverged by step {step}: the mean training loss {mean:.4g} of steps "
                    f"{self.first_step}-{step} is over {self.factor:g} times the first step's "
                    f"{self.reference:.4g} (--max-loss-factor; 0 turns this check off)",
                    optimizer,
                    nonfinite=False,
                )

    def _bad_weights(self, model: nn.Module) -> list[str]:
        named = list(model.named_parameters())
        if not named:
            return []
        sums = torch.stack([p.detach().float().sum().reshape(()) for _, p in named])
        if bool(torch.isfinite(sums).all()):
            return []
        return [name for name, p in named if not bool(torch.isfinite(p.detach()).all())] or [
            name for (name, _), s in zip(named, sums.tolist(), strict=True) if not math.isfinite(s)
        ]

    @staticmethod
    def _bad_gradients(model: nn.Module) -> list[str]:
        return [
            name
            for name, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad.detach()).all())
        ]

    # -- the message --------------------------------------------------------------------------------------

    def _error(self, what: str, optimizer: torch.optim.Optimizer, nonfinite: bool = True) -> DivergenceError:
        config = self.config
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        cause = f"--lr {lr:g} with --optimizer {config.optimizer}" if isinstance(lr, float) else "the lr"
        fixes = "lower --lr (e.g. by 10x)"
        if getattr(config, "clip_grad_norm", None) is None:
            fixes += ", or add --clip-grad-norm 1.0"
        if self.mode == "stop" and nonfinite:
            fixes += " (--on-nonfinite skip drops a non-finite step instead of stopping)"
        checkpoints = getattr(config, "checkpoints", True)
        advice = restart_advice(Path(config.out) / "checkpoints" if checkpoints else None)
        return DivergenceError(
            f"{self.prefix}{what}. The learning rate is likely too high ({cause}): {fixes}. {advice}"
        )
