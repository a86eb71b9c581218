"""A codec's memory as wrappers: error feedback, momentum correction, a per-rank random stream.

Each wrapper is a :class:`~.base.Codec` around a codec, with its state in a class of its own (as torch keeps
``PowerSGDState`` apart from its hook); ``encode`` updates that state, ``decode`` is the inner codec's and
stays pure. Wrappers compose by wrapping: ``MomentumCorrection(ErrorFeedback(TopK(...)))`` is DGC's memory.

* :class:`ErrorFeedback` (Seide et al. 2014; Stich, Cordonnier and Jaggi 2018): with the residual ``e``
  of the bucket, ``v = g + e``, send ``p = encode(v)``, keep ``e' = v - decode(p)`` -- exactly what was not
  sent, added to the next step's gradient. It also counts the bucket's steps (``context.step``).
* :class:`MomentumCorrection` (Lin et al. 2018, section 3.1): encode the velocity ``u <- m u + g`` instead
  of ``g``; optionally clip ``g`` first to ``clip_norm / sqrt(R)`` (DGC's local clipping) and zero ``u``
  where a sparse payload sent a coordinate (DGC's momentum factor masking). The codec *is* the momentum,
  so the optimizer must have none: :func:`check_optimizer` is that check, one call per entry point.
* :class:`RandomStream`: this rank's ``torch.Generator`` for stochastic rounding (TernGrad, QSGD), seeded
  from ``context.stream_seed`` on first use, saved in checkpoints so a resumed run repeats the draws.

On a GPU: the state tensors are created like the bucket (``zeros_like``: its device); DGC's clipping
compares the norm with the bound and scales on the device (no host read of the norm); a random stream
keeps one generator per device (a CUDA tensor needs a CUDA generator), each seeded from the same
``stream_seed`` when first used.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from distlearn.comm.compression.base import BucketContext, Codec, Payload, WireFormat
from distlearn.errors import ConfigError

__all__ = [
    "CodecWrapper",
    "ErrorFeedback",
    "ErrorFeedbackState",
    "MomentumCorrection",
    "MomentumState",
    "RandomStream",
    "RandomStreamState",
    "applies_momentum",
    "check_optimizer",
    "refuse_optimizer_momentum",
    "upgrade_state_dict",
]


def _zeros_for(store: dict[str, torch.Tensor], key: str, like: torch.Tensor, what: str) -> torch.Tensor:
    """``store[key]``, created as zeros like ``like``; ConfigError if a restored one has another shape."""
    tensor = store.get(key)
    if tensor is None:
        tensor = store[key] = torch.zeros_like(like)
    elif tensor.shape != like.shape:
        raise ConfigError(
            f"compressor state {what!r} of bucket {key!r} has shape {tuple(tensor.shape)} but the bucket "
            f"now has {tuple(like.shape)}: the checkpoint belongs to a different model or bucket size"
        )
    return tensor


def _tensors(state: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    return {str(k): t.clone() for k, t in state.get(name, {}).items()}


def upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A codec ``state_dict`` in this version's layout; a checkpoint written before the memory wrappers (one
    ``"state"`` entry with ``tensors[key][name]`` and ``counters``) is converted, so it still resumes."""
    if "state" not in state:
        return state
    old, tensors = state["state"], state["state"].get("tensors", {})
    steps = {str(k): int(v) for k, v in old.get("counters", {}).items()}

    def named(name: str) -> dict[str, torch.Tensor]:
        return {k: v[name] for k, v in tensors.items() if name in v}

    qs = {k: {int(n[1:]): t for n, t in v.items() if n.startswith("q")} for k, v in tensors.items()}
    new: dict[str, Any] = {
        "name": state.get("name"),
        "error_feedback": {"residuals": named("residual"), "steps": steps},
        "momentum": {"velocities": named("momentum")},
        "powersgd": {"residuals": named("residual"), "steps": steps, "qs": qs},
    }
    if "generator" in state:
        new["random_stream"] = {"generator": state["generator"], "seeded": True}
    return new


# -- states ------------------------------------------------------------------------------------------------


class ErrorFeedbackState:
    """Per bucket ``key``: the residual ``e`` (what was not sent yet) and how many steps were encoded."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}

    def residual(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return _zeros_for(self.residuals, key, like, "residual")

    def next_step(self, key: str) -> int:
        """How many times bucket ``key`` has been encoded before (then counts this one)."""
        count = self.steps.get(key, 0)
        self.steps[key] = count + 1
        return count

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: t.clone() for k, t in self.residuals.items()}, "steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = _tensors(state, "residuals")
        self.steps = {str(k): int(v) for k, v in state.get("steps", {}).items()}


class MomentumState:
    """Per bucket ``key``: the velocity ``u`` of the momentum correction."""

    def __init__(self) -> None:
        self.velocities: dict[str, torch.Tensor] = {}

    def velocity(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return _zeros_for(self.velocities, key, like, "momentum")

    def state_dict(self) -> dict[str, Any]:
        return {"velocities": {k: t.clone() for k, t in self.velocities.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocities = _tensors(state, "velocities")


class RandomStreamState:
    """This rank's random generator (one for every bucket, drawn from in call order) and whether it has been
    seeded yet (it is seeded from ``context.stream_seed`` at the first encode, unless restored).

    ``generator`` draws for CPU tensors; a tensor on another device draws from that device's generator
    (:meth:`generator_for`, in ``devices``), created and seeded from the same ``stream_seed`` on first use.
    Every generator's state is saved (``"generator"``: the CPU one, as before; ``"devices"``: the others).
    """

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.seeded = False
        self.devices: dict[str, torch.Generator] = {}
        self._saved: dict[str, torch.Tensor] = {}  # restored states of device generators not created yet

    def generator_for(self, device: torch.device, seed: int) -> torch.Generator:
        """The generator for tensors on ``device`` (seeded from ``seed`` when created, unless restored)."""
        if device.type == "cpu":
            return self.generator
        key = str(device)
        generator = self.devices.get(key)
        if generator is None:
            generator = self.devices[key] = torch.Generator(device=device).manual_seed(seed)
            if key in self._saved:
                generator.set_state(self._saved.pop(key))
        return generator

    def state_dict(self) -> dict[str, Any]:
        devices = {**self._saved, **{k: g.get_state() for k, g in self.devices.items()}}
        return {"generator": self.generator.get_state(), "seeded": self.seeded, "devices": devices}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.seeded = bool(state.get("seeded", True))
        self.devices, self._saved = {}, dict(state.get("devices", {}))


# -- wrappers ----------------------------------------------------------------------------------------------


class CodecWrapper(Codec):
    """A codec around ``codec``: its name, exchange and byte format, decode and settings are the inner
    codec's; subclasses add a ``state`` (saved under ``state_key``) and change :meth:`encode`."""

    state_key = "wrapper"
    state: Any

    def __init__(self, codec: Codec) -> None:
        if not isinstance(codec, Codec):
            raise ConfigError(f"{type(self).__name__} wraps a Codec, got {type(codec).__name__}")
        self.codec = codec

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return self.codec.name

    @property  # type: ignore[override]
    def summable(self) -> bool:  # type: ignore[override]
        return self.codec.summable

    @property  # type: ignore[override]
    def wire(self) -> WireFormat:  # type: ignore[override]
        return self.codec.wire

    @property
    def handles_momentum(self) -> bool:
        return self.codec.handles_momentum

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        return self.codec.encode(tensor, context)

    def decode(self, payload: Payload, context: BucketContext) -> torch.Tensor:
        return self.codec.decode(payload, context)

    def expected_nbytes(self, context: BucketContext) -> int | None:
        return self.codec.expected_nbytes(context)

    def options(self) -> dict[str, Any]:
        return self.codec.options()

    def state_dict(self) -> dict[str, Any]:
        return {**self.codec.state_dict(), self.state_key: self.state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = upgrade_state_dict(state)
        self.codec.load_state_dict(state)
        if self.state_key not in state:
            raise ConfigError(
                f"the checkpoint's {self.name!r} compression state has no {self.state_key!r} part: it was "
                "written with other codec options; resume with the same --compression options"
            )
        self.state.load_state_dict(state[self.state_key])


class ErrorFeedback(CodecWrapper):
    """``v = g + e``; send ``encode(v)``; keep ``e' = v - decode(encode(v))`` (per bucket, in
    :class:`ErrorFeedbackState`). Also sets ``context.step`` for the inner codec."""

    state_key = "error_feedback"

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec)
        self.state = ErrorFeedbackState()

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        residual = self.state.residual(context.key, tensor)
        context = replace(context, step=self.state.next_step(context.key))
        v = tensor + residual
        payload = self.codec.encode(v, context)
        torch.sub(v, self.codec.decode(payload, context), out=residual)
        return payload


class MomentumCorrection(CodecWrapper):
    """Encode the velocity ``u <- m u + g`` instead of ``g`` (per bucket, in :class:`MomentumState`).

    Args:
        codec: the codec (usually with :class:`ErrorFeedback`) that sends ``u``.
        momentum: ``m`` in [0, 1).
        clip_norm: clip ``g`` to the 2-norm ``clip_norm / sqrt(R)`` before the update (DGC's local clipping,
            ``R = context.world_size``); None: no clipping.
        mask_sent: zero ``u`` at the coordinates the payload sent (DGC's momentum factor masking); the inner
            codec's payload must carry them as ``indices``.
    """

    state_key = "momentum"

    def __init__(
        self, codec: Codec, momentum: float, *, clip_norm: float | None = None, mask_sent: bool = False
    ) -> None:
        super().__init__(codec)
        if mask_sent and "indices" not in codec.wire.names:
            raise ConfigError(
                f"momentum factor masking needs a sparse codec whose payload holds 'indices'; "
                f"{codec.name} sends {', '.join(codec.wire.names) or 'nothing'}"
            )
        self.momentum = float(momentum)
        self.clip_norm = clip_norm
        self.mask_sent = mask_sent
        self.state = MomentumState()

    @property
    def handles_momentum(self) -> bool:
        return True

    def options(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"momentum": self.momentum}
        if self.clip_norm is not None:
            extra["clip_norm"] = self.clip_norm
        return {**self.codec.options(), **extra}

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        velocity = self.state.velocity(context.key, tensor)  # u
        g = tensor
        if self.clip_norm is not None:  # g * float32(bound / norm) where norm > bound, on the device
            bound = self.clip_norm / math.sqrt(context.world_size)
            norm = g.norm().to(torch.float64)
            g = g * torch.where(norm > bound, bound / norm, 1.0).to(g.dtype)
        velocity.mul_(self.momentum).add_(g)
        payload = self.codec.encode(velocity, context)
        if self.mask_sent:
            velocity[payload.tensors["indices"].long()] = 0
        return payload


class RandomStream(CodecWrapper):
    """Hands the inner codec this rank's generator as ``context.generator`` (in :class:`RandomStreamState`),
    seeded from ``context.stream_seed`` at the first encode unless a checkpoint restored it."""

    state_key = "random_stream"

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec)
        self.state = RandomStreamState()

    def encode(self, tensor: torch.Tensor, context: BucketContext) -> Payload:
        if not self.state.seeded:
            self.state.generator.manual_seed(context.stream_seed)
            self.state.seeded = True
        generator = self.state.generator_for(tensor.device, context.stream_seed)
        return self.codec.encode(tensor, replace(context, generator=generator))


# -- the optimizer check -------------------------------------------------------------------------------------


def applies_momentum(codec: Codec) -> bool:
    """Whether ``codec``'s stack holds a :class:`MomentumCorrection` (the codec is the momentum)."""
    while isinstance(codec, CodecWrapper):
        if isinstance(codec, MomentumCorrection):
            return True
        codec = codec.codec
    return False


def refuse_optimizer_momentum(name: str, optimizer: torch.optim.Optimizer) -> None:
    """ConfigError if ``optimizer`` keeps momentum or moment estimates (codec ``name`` applies momentum)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) or "betas" in group or "decay" in group:
            raise ConfigError(
                f"--compression {name} applies momentum itself (momentum correction, Lin et al. "
                f"2018) to the gradient it sends; with {type(optimizer).__name__}'s own momentum or "
                "moment estimates the update would apply it twice -- use --optimizer sgd (no "
                "momentum) and set the codec's momentum (--compression-option momentum=0.9)"
            )


def check_optimizer(codec: Codec, optimizer: torch.optim.Optimizer) -> None:
    """ConfigError if ``codec`` applies momentum and ``optimizer`` has momentum of its own; else nothing.

    The one check of that rule: call it once per entry point (the trainer before any process starts, with
    an optimizer built on a probe tensor; the strategy when it meets the real optimizer).
    """
    if applies_momentum(codec):
        refuse_optimizer_momentum(codec.name, optimizer)
