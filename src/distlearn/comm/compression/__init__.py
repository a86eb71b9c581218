"""Gradient compression: codecs with residual state, exchanged by allreduce or all-gather, bytes counted.

One file per family, simple to complex; the contract is :class:`.base.Codec` (pure ``encode``/``decode``),
the memory is wrappers (:mod:`.memory`), the adapters are :mod:`.reducer` (bucketer), :mod:`.push`
(parameter-server pushes) and :mod:`distlearn.comm.ddp_hooks` (DDP); :func:`create_compressor` builds a
name's stack:

===============  =====================  ===========  ===================================  ====================
name             file                   exchange     payload per n float32 elements       stack
===============  =====================  ===========  ===================================  ====================
``fp16``         casts.py               allreduce    2n bytes                             codec
``bf16``         casts.py               allreduce    2n bytes                             codec
``int8-linear``  eightbit.py            all-gather   n bytes + 4 per tensor               codec
``int8-tree``    eightbit.py            all-gather   n bytes + 4 per tensor               codec
``threshold``    threshold.py           all-gather   4 bytes per element ``>= tau``       EF
``onebit``       onebit.py              all-gather   n/8 bytes + 8 per tensor             EF (+ momentum)
``terngrad``     stochastic.py          all-gather   n/4 bytes + 4 per tensor             random stream
``qsgd``         stochastic.py          all-gather   n b/8 bytes + 4 per chunk            random stream
``topk``         sparse.py              all-gather   8 k bytes                            EF
``randomk``      sparse.py              allreduce    4 k bytes (shared indices)           EF
``dgc``          dgc.py                 all-gather   8 k bytes                            momentum(EF)
``powersgd``     powersgd.py            allreduce    4 (n + m) r bytes per matrix         own PowerSGDState
===============  =====================  ===========  ===================================  ====================

(EF: :class:`.memory.ErrorFeedback`; momentum: :class:`.memory.MomentumCorrection`; random stream:
:class:`.memory.RandomStream`.)

Use it with the sync strategy (``distlearn train --strategy sync --compression onebit``), with
:func:`distlearn.parallelize` (``compression="topk", compression_options={"density": 0.01}``), or as a DDP
comm hook (:func:`distlearn.comm.ddp_hooks.compression_ddp_comm_hook`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from distlearn.comm.compression.base import (
    BucketContext,
    Codec,
    CollectiveCodec,
    Compressor,
    Payload,
    WireFormat,
    check_positive,
    pack_bits,
    stream_seed,
    unpack_bits,
)
from distlearn.comm.compression.casts import BF16Cast, FP16Cast
from distlearn.comm.compression.dgc import DGCSparsifier
from distlearn.comm.compression.eightbit import DynamicTree8Bit, Linear8Bit
from distlearn.comm.compression.exchange import Exchange, reduce_bucket
from distlearn.comm.compression.memory import (
    ErrorFeedback,
    ErrorFeedbackState,
    MomentumCorrection,
    MomentumState,
    RandomStream,
    RandomStreamState,
    applies_momentum,
    check_optimizer,
)
from distlearn.comm.compression.onebit import OneBitSGD
from distlearn.comm.compression.powersgd import PowerSGD, PowerSGDState
from distlearn.comm.compression.reducer import CompressedReducer
from distlearn.comm.compression.sparse import RandomK, TopK
from distlearn.comm.compression.stochastic import QSGD, TernGrad
from distlearn.comm.compression.threshold import StromThreshold
from distlearn.errors import ConfigError

__all__ = [
    "COMPRESSORS",
    "BF16Cast",
    "BucketContext",
    "Codec",
    "CollectiveCodec",
    "CompressedReducer",
    "Compressor",
    "DGCSparsifier",
    "DynamicTree8Bit",
    "ErrorFeedback",
    "ErrorFeedbackState",
    "Exchange",
    "FP16Cast",
    "Linear8Bit",
    "MomentumCorrection",
    "MomentumState",
    "OneBitSGD",
    "Payload",
    "PowerSGD",
    "PowerSGDState",
    "QSGD",
    "RandomK",
    "RandomStream",
    "RandomStreamState",
    "StromThreshold",
    "TernGrad",
    "TopK",
    "WireFormat",
    "applies_momentum",
    "check_optimizer",
    "create_compressor",
    "pack_bits",
    "reduce_bucket",
    "stream_seed",
    "unpack_bits",
]


def _momentum(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{what}: momentum must be a number in [0, 1), got {value!r}")
    return float(value)


def _threshold(*, threshold: float = 1e-3) -> Codec:
    """Strom's threshold quantisation with its residual."""
    return ErrorFeedback(StromThreshold(threshold=threshold))


def _onebit(*, momentum: float = 0.0) -> Codec:
    """1-bit SGD with error feedback; ``momentum > 0``: quantise the velocity (use the optimizer without)."""
    codec: Codec = ErrorFeedback(OneBitSGD())
    momentum = _momentum(momentum, "onebit")
    return MomentumCorrection(codec, momentum) if momentum else codec


def _terngrad(*, clip_sigma: float | None = 2.5) -> Codec:
    """TernGrad with this rank's random stream."""
    return RandomStream(TernGrad(clip_sigma=clip_sigma))


def _qsgd(*, levels: int = 4, chunk: int = 512) -> Codec:
    """QSGD with this rank's random stream."""
    return RandomStream(QSGD(levels=levels, chunk=chunk))


def _topk(*, density: float = 0.01) -> Codec:
    """Top-k with its residual."""
    return ErrorFeedback(TopK(density=density))


def _randomk(*, density: float = 0.01) -> Codec:
    """Random-k (an index set shared by all ranks) with its residual."""
    return ErrorFeedback(RandomK(density=density))


def _dgc(
    *,
    density: float = 0.001,
    momentum: float = 0.9,
    clip_norm: float | None = None,
    warmup_steps: int = 0,
    warmup_stages: int = 4,
) -> Codec:
    """Deep Gradient Compression: momentum correction and masking, local clipping, residual, warm-up."""
    sparsifier = DGCSparsifier(density=density, warmup_steps=warmup_steps, warmup_stages=warmup_stages)
    if isinstance(momentum, bool) or not 0 <= momentum < 1:
        raise ConfigError(f"dgc: momentum must be in [0, 1), got {momentum!r}")
    if clip_norm is not None:
        check_positive("clip_norm", clip_norm, "dgc")
    return MomentumCorrection(ErrorFeedback(sparsifier), momentum, clip_norm=clip_norm, mask_sent=True)


COMPRESSORS: dict[str, Callable[..., Codec]] = {
    "fp16": FP16Cast,
    "bf16": BF16Cast,
    "int8-linear": Linear8Bit,
    "int8-tree": DynamicTree8Bit,
    "threshold": _threshold,
    "onebit": _onebit,
    "terngrad": _terngrad,
    "qsgd": _qsgd,
    "topk": _topk,
    "randomk": _randomk,
    "dgc": _dgc,
    "powersgd": PowerSGD,
}
"""Every codec by name, for ``--compression`` and :func:`create_compressor`: a callable taking the codec's
keyword options and returning the codec with its memory wrappers (a fresh state)."""


def create_compressor(name: str, **options: Any) -> Codec:
    """The codec called ``name`` (a key of :data:`COMPRESSORS`) with ``options``, wrapped in the memory it
    needs (error feedback, momentum correction, a random stream); ConfigError if unknown."""
    if name not in COMPRESSORS:
        raise ConfigError(f"unknown compression {name!r}; choose one of: none, {', '.join(COMPRESSORS)}")
    build = COMPRESSORS[name]
    accepted = list(inspect.signature(build).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ConfigError(f"compression {name!r} does not take {', '.join(unknown)}; it takes: {takes}")
    return build(**options)
