"""Mixed precision: autocast for the forward pass, loss scaling for fp16, and its rules with gradient codecs.

``--amp bf16`` runs the forward pass and the loss under ``torch.autocast`` with bfloat16 (matrix products
and convolutions in bf16, reductions and the loss in float32 by torch's autocast policy); the weights,
gradients and optimizer state stay float32. bf16 has float32's exponent range, so gradients do not
underflow and no loss scaling is needed. ``--amp fp16`` autocasts to float16, whose range is narrow: small
gradients underflow to zero. Loss scaling (Micikevicius et al., "Mixed Precision Training", ICLR 2018)
multiplies the loss by ``S`` before backward, so every gradient is computed as ``S g``, and divides by
``S`` before the step; ``torch.amp.GradScaler`` picks ``S`` dynamically: a step whose gradients hold inf
or NaN is skipped and ``S`` is halved, and after 2000 clean steps ``S`` doubles.

The order of one fp16 step on a replica, with the sync strategy and a gradient codec (:class:`LossScaleGuard`
does steps 3-6 inside the gradient bucketer, :class:`Precision` the rest)::

    1. with autocast: loss = L(model(x), y)          # forward in fp16
    2. (S * loss).backward()                          # scaler.scale(loss): gradients S g_r
    3. each bucket: b <- b / S; found_r |= any(!isfinite(b)); non-finite entries <- 0   # unscale
    4. encode b, exchange, decode (the codec and its residuals see g_r, never S g_r)     # reduce
    5. found = max over ranks of found_r              # one allreduce of a flag
    6. found: every rank restores its codec state (residuals, momentum, PowerSGD's Q, the
       random stream, step counters) to what it was before step 3, and fills the buckets with NaN;
       else: param.grad <- S * (average)              # back in the scaler's units, exact for S = 2^k
    7. scaler.unscale_(opt); clip; scaler.step(opt); scaler.update()   # torch's own: skips the step on
                                                      # every rank alike (all hold NaN), halves S alike

So a step with an inf or NaN gradient on any rank is skipped on every rank, leaves every codec's state as
it was, and the scale follows the same sequence everywhere. Without a codec nothing is needed beyond
torch's own recipe: the allreduce sums carry an inf or NaN of one rank into every rank's gradient (IEEE
arithmetic), and the reducers give every rank the same sum.

Costs of the guard (fp16 with a codec only): one copy of the codec's state per step (the snapshot), an
allreduce of one number, one host synchronisation per step (the skip decision), and three element-wise
passes over each bucket.

Python API::

    precision = Precision("fp16", "cuda")
    with precision.autocast():
        loss = loss_fn(model(x), y)
    precision.backward(loss)
    strategy.before_step(model, optimizer, step)   # sync: steps 3-6
    precision.step(optimizer, parameters, clip_norm=None)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlearn.errors import CommError, ConfigError

__all__ = ["AMP_MODES", "LossScaleGuard", "Precision", "check_amp", "check_closure", "device_type_of"]

AMP_MODES = ("none", "bf16", "fp16")
"""``--amp`` values: float32 compute, bfloat16 autocast, float16 autocast with loss scaling."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device_type: str | None = None) -> None:
    """ConfigError if ``amp`` is not a mode, or (``device_type`` given) torch cannot autocast to it there."""
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown --amp {amp!r}; choose one of: {', '.join(AMP_MODES)}")
    if amp == "none" or device_type is None:
        return
    other = "fp16" if amp == "bf16" else "bf16"
    try:
        with warnings.catch_warnings():  # torch warns and disables autocast for a dtype it lacks
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=_DTYPES[amp]):
                enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError as error:  # e.g. a GPU without bf16
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--amp {amp} is not available on {device_type} ({first}); use --amp {other} or --amp none"
        ) from error
    if not enabled:
        raise ConfigError(
            f"--amp {amp}: torch {torch.__version__} has no {amp} autocast on {device_type}; "
            f"use --amp {other} or --amp none"
        )


def check_closure(amp: str, closure: bool) -> None:
    """ConfigError for fp16 with an optimizer that re-evaluates the loss in ``step(closure)``."""
    if amp == "fp16" and closure:
        raise ConfigError(
            "--amp fp16 scales the loss and skips steps with inf/NaN gradients, which an optimizer that "
            "re-evaluates the loss in step(closure) (CG, L-BFGS) cannot follow; use --amp bf16 (no "
            "loss scaling) or a first-order optimizer"
        )


def device_type_of(model: nn.Module) -> str:
    """The device type (``"cpu"``, ``"cuda"``) of ``model``'s first parameter; ``"cpu"`` without any."""
    return next((p.device.type for p in model.parameters()), "cpu")


class Precision:
    """One run's mixed precision: the autocast context, the loss scaler (fp16 only) and the step.

    Args:
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (:data:`AMP_MODES`).
        device_type: where the model computes, ``"cpu"`` or ``"cuda"`` (:func:`device_type_of`).
        closure: the optimizer re-evaluates the loss in ``step(closure)`` (CG, L-BFGS): refused with fp16,
            whose scaler must see one backward per step.

    Attributes:
        scaler: the ``torch.amp.GradScaler`` with fp16, else None (bf16 needs no scaling).
    """

    def __init__(self, amp: str = "none", device_type: str = "cpu", *, closure: bool = False) -> None:
        check_amp(amp, device_type)
        check_closure(amp, closure)
        self.amp = amp
        self.device_type = device_type
        self.dtype = _DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's context: ``torch.autocast`` to bf16/fp16, or nothing with ``"none"``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of ``S * loss`` with the scaler."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], clip_norm: float | None
    ) -> None:
        """Clip (on the unscaled gradient) and step; with the scaler, skip a step whose gradients hold inf or
        NaN and update the scale (``unscale_``, ``step``, ``update`` of ``torch.amp.GradScaler``)."""
        if self.scaler is None:
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(list(parameters), clip_norm)
            optimizer.step()
            return
        if clip_norm is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(list(parameters), clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The mode and the scaler's state (scale, growth tracker), for a checkpoint."""
        return {"amp": self.amp, "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint from before ``--amp``) leaves a fresh scaler."""
        if state is None:
            return
        if state.get("amp") != self.amp:
            raise ConfigError(
                f"--resume: the checkpoint was written with --amp {state.get('amp')} but this run has "
                f"--amp {self.amp}; pass --amp {state.get('amp')} to continue it, or drop --resume"
            )
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class LossScaleGuard:
    """Loss scaling around a gradient codec inside the bucketer: unscale before encoding, agree on skips.

    The bucketer calls :meth:`unscale` on each bucket before it is sent (steps 3 of the module docstring),
    :meth:`settle` once all of a step's buckets are reduced (steps 5-6), and :meth:`drop` when it throws
    away buckets sent too early (accumulation without ``no_sync``).

    Args:
        scaler: the ``torch.amp.GradScaler`` that scaled the loss; its current scale is read as a tensor
            (``scaler.scale(1)``), with no host synchronisation.
        reducer: the codec's reducer; its ``state_dict()`` is the snapshot taken before a step's first
            encode and its ``load_state_dict()`` restores it when the step is skipped.
        group: the process group whose ranks must agree (default: the default group).
        timeout_s: deadline of the flag's allreduce.

    Attributes:
        skipped: steps skipped because some rank had an inf or NaN gradient.
    """

    def __init__(self, scaler: Any, reducer: Any, *, group: Any = None, timeout_s: float = 300.0) -> None:
        self.scaler = scaler
        self.reducer = reducer
        self.group = group
        self.timeout_s = timeout_s
        self.skipped = 0
        self._open = False
        self._scale: torch.Tensor | None = None
        self._inverse: torch.Tensor | None = None
        self._found: torch.Tensor | None = None
        self._saved: dict[str, Any] | None = None

    def _begin(self, device: torch.device) -> None:
        """The step's first bucket: read the scale, clear the flag, snapshot the codec's state."""
        self._scale = self.scaler.scale(torch.ones((), device=device))
        self._inverse = self._scale.double().reciprocal().float()  # exact for S = 2^k
        self._found = torch.zeros((), device=device)
        self._saved = self.reducer.state_dict() if hasattr(self.reducer, "state_dict") else None
        self._open = True

    @torch.no_grad()
    def unscale(self, buffer: torch.Tensor) -> None:
        """``buffer <- buffer / S`` in place, non-finite entries set to 0 and noted in this rank's flag."""
        if not self._open:
            self._begin(buffer.device)
        assert self._found is not None and self._inverse is not None
        bad = torch.isfinite(buffer).logical_not_()
        torch.maximum(self._found, bad.any().to(self._found.dtype), out=self._found)
        buffer.mul_(self._inverse).masked_fill_(bad, 0.0)  # the codec never sees inf or NaN

    @torch.no_grad()
    def settle(self, buffers: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """After every bucket is reduced: agree across ranks; on a skip restore the codec's state and fill
        ``buffers`` with NaN. Returns the scale ``S`` the averaged buckets are multiplied by (None if no
        bucket was unscaled this step)."""
        if not self._open:
            return None
        assert self._found is not None
        found = self._found
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            work = dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            try:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            except Exception as error:  # gloo's timeouts and closed connections
                raise CommError(
                    f"rank {dist.get_rank()}: the allreduce of the inf/NaN gradient flag did not complete "
                    f"within {self.timeout_s:g} s ({error}); a peer may have died or be stuck"
                ) from error
        if found.item():  # the one host synchronisation of the step: the skip decision
            if self._saved is not None:
                self.reducer.load_state_dict(self._saved)
            for buffer in buffers:
                buffer.fill_(math.nan)  # the scaler's own check then skips the step on every rank
            self.skipped += 1
        scale = self._scale
        self._close()
        return scale

    def drop(self) -> None:
        """The step's buckets were sent and are being thrown away: restore the codec's state, start over."""
        if self._open and self._saved is not None:
            self.reducer.load_state_dict(self._saved)
        self._close()

    def _close(self) -> None:
        self._open = False
        self._saved = self._found = self._scale = self._inverse = None
