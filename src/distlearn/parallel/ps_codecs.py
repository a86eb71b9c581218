"""Gradient codecs for parameter-server pushes: which codecs can serve them, and the byte format of a push.

A push is encoded on the worker (the codec keeps its error-feedback residual per server, ``key``) and
decoded on the server before its optimizer sees it; see "compressed pushes" in :mod:`distlearn.parallel.ps`.
"""

from __future__ import annotations

from typing import Any

import torch

from distlearn.errors import ConfigError

__all__ = ["decode_push", "encode_push", "make_push_codec"]

# codecs that need every rank in one collective, or that take over the optimizer's momentum
_NOT_FOR_PUSHES = {
    "powersgd": "PowerSGD allreduces its factors P and Q across all ranks at once, and pushes arrive one "
    "at a time",
    "randomk": "random-k relies on an index set drawn identically by all ranks in one step, which a server "
    "that takes pushes from workers at different steps cannot rebuild",
    "dgc": "DGC's momentum correction replaces the optimizer's momentum, which here lives on the server "
    "(use topk: the same sparsification with residuals)",
}


def make_push_codec(name: str, options: dict[str, Any]) -> Any:
    """The codec ``name`` for parameter-server pushes; ConfigError if it cannot serve them (and why)."""
    if name in _NOT_FOR_PUSHES:
        raise ConfigError(f"--compression {name} cannot serve --strategy ps: {_NOT_FOR_PUSHES[name]}")
    from distlearn.comm.compression import create_compressor

    codec = create_compressor(name, **options)
    if codec.handles_momentum:
        raise ConfigError(
            f"--compression {name} with momentum cannot serve --strategy ps: its momentum correction "
            "replaces the optimizer's momentum, which here lives on the server (drop the codec's momentum "
            "option)"
        )
    return codec


def encode_push(codec: Any, key: str, flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``flat`` (tensors of ``sizes`` elements back to back) encoded by ``codec`` -- its residual for ``key``
    updated, per-tensor statistics (scales, norms) per tensor -- as one self-describing byte vector."""
    from distlearn.comm.compression.base import payload_to_bytes

    payload = codec.encode(key, flat, [(n,) for n in sizes])
    return payload_to_bytes([payload.tensors[n] for n in codec.payload_names], header=True)


def decode_push(codec: Any, wire: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The dense gradient (tensors of ``sizes`` elements) that the bytes of :func:`encode_push` stand for."""
    from distlearn.comm.compression.base import Payload, bytes_to_payload

    tensors = bytes_to_payload(wire, codec.payload_dtypes, None)
    payload = Payload(dict(zip(codec.payload_names, tensors, strict=True)))
    return codec.decode(payload, sum(sizes), [(n,) for n in sizes]).float()
