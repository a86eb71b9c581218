"""Gradient compression: codecs with residual state, exchanged by allreduce or all-gather, bytes counted.

One file per family, simple to complex; the contract is :class:`.base.Compressor`:

===============  =====================  ===========  ===================================  =================
name             file                   exchange     payload per n float32 elements       residual
===============  =====================  ===========  ===================================  =================
``fp16``         casts.py               allreduce    2n bytes                             --
``bf16``         casts.py               allreduce    2n bytes                             --
``int8-linear``  eightbit.py            all-gather   n bytes + 4 per tensor               --
``int8-tree``    eightbit.py            all-gather   n bytes + 4 per tensor               --
``threshold``    threshold.py           all-gather   4 bytes per element ``>= tau``       yes
``onebit``       onebit.py              all-gather   n/8 bytes + 8 per tensor             yes
``terngrad``     stochastic.py          all-gather   n/4 bytes + 4 per tensor             --
``qsgd``         stochastic.py          all-gather   n b/8 bytes + 4 per chunk            --
``topk``         sparse.py              all-gather   8 k bytes                            yes
``randomk``      sparse.py              allreduce    4 k bytes (shared indices)           yes
``dgc``          dgc.py                 all-gather   8 k bytes                            yes (+momentum)
``powersgd``     powersgd.py            allreduce    4 (n + m) r bytes per matrix         yes
===============  =====================  ===========  ===================================  =================

Use it with the sync strategy (``distlearn train --strategy sync --compression onebit``), with
:func:`distlearn.parallelize` (``compression="topk", compression_options={"density": 0.01}``), or as a DDP
comm hook (:func:`distlearn.comm.ddp_hooks.compression_ddp_comm_hook`).
"""

from __future__ import annotations

import inspect
from typing import Any

from distlearn.comm.compression.base import (
    Compressor,
    CompressorState,
    Exchange,
    Payload,
    pack_bits,
    unpack_bits,
)
from distlearn.comm.compression.casts import BF16Cast, FP16Cast
from distlearn.comm.compression.dgc import DGC
from distlearn.comm.compression.eightbit import DynamicTree8Bit, Linear8Bit
from distlearn.comm.compression.onebit import OneBitSGD
from distlearn.comm.compression.powersgd import PowerSGD
from distlearn.comm.compression.reducer import CompressedReducer
from distlearn.comm.compression.sparse import RandomK, TopK
from distlearn.comm.compression.stochastic import QSGD, TernGrad
from distlearn.comm.compression.threshold import StromThreshold
from distlearn.errors import ConfigError

__all__ = [
    "COMPRESSORS",
    "BF16Cast",
    "CompressedReducer",
    "Compressor",
    "CompressorState",
    "DGC",
    "DynamicTree8Bit",
    "Exchange",
    "FP16Cast",
    "Linear8Bit",
    "OneBitSGD",
    "Payload",
    "PowerSGD",
    "QSGD",
    "RandomK",
    "StromThreshold",
    "TernGrad",
    "TopK",
    "create_compressor",
    "pack_bits",
    "unpack_bits",
]

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (
        FP16Cast,
        BF16Cast,
        Linear8Bit,
        DynamicTree8Bit,
        StromThreshold,
        OneBitSGD,
        TernGrad,
        QSGD,
        TopK,
        RandomK,
        DGC,
        PowerSGD,
    )
}
"""Every codec by name, for ``--compression`` and :func:`create_compressor`."""


def create_compressor(name: str, **options: Any) -> Compressor:
    """The codec called ``name`` (a key of :data:`COMPRESSORS`) with ``options``; ConfigError if unknown."""
    if name not in COMPRESSORS:
        raise ConfigError(f"unknown compression {name!r}; choose one of: none, {', '.join(COMPRESSORS)}")
    cls = COMPRESSORS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ConfigError(f"compression {name!r} does not take {', '.join(unknown)}; it takes: {takes}")
    return cls(**options)
