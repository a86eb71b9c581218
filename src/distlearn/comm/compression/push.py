"""The parameter-server push's adapter: the worker's :func:`encode_push` and the server's :func:`decode_push`.

A worker sends each server its shard of the gradient (tensors of ``sizes`` elements back to back) through
the codec, as one self-describing byte vector: the payload's tensors with a header of their lengths. The
worker's codec keeps its memory (error-feedback residual, per server: ``key``); the server decodes with any
codec object of the same name and options, since decoding is pure. Each push is one worker's alone, so the
context is a group of one (``world_size`` 1, ``seed`` 0, ``stream_seed`` 0: every worker's random stream
starts from seed 0, as pushes always did).

Codecs that need every rank at once cannot serve pushes that arrive one at a time, and neither can a codec
that applies momentum (the optimizer's momentum lives on the server): :func:`create_push_codec` refuses
them, saying why.
"""

from __future__ import annotations

from typing import Any

import torch

from distlearn.comm.compression.base import BucketContext, Codec, Payload, bytes_to_payload, payload_to_bytes
from distlearn.comm.compression.memory import applies_momentum
from distlearn.errors import ConfigError

__all__ = ["NOT_FOR_PUSHES", "create_push_codec", "decode_push", "encode_push", "push_context"]

NOT_FOR_PUSHES = {
    "powersgd": "PowerSGD allreduces its factors P and Q across all ranks at once, and pushes arrive one "
    "at a time",
    "randomk": "random-k relies on an index set drawn identically by all ranks in one step, which a server "
    "that takes pushes from workers at different steps cannot rebuild",
    "dgc": "DGC's momentum correction replaces the optimizer's momentum, which here lives on the server "
    "(use topk: the same sparsification with residuals)",
}
"""Codecs that cannot serve parameter-server pushes, and why."""


def create_push_codec(name: str, options: dict[str, Any]) -> Codec:
    """The codec ``name`` with ``options`` for parameter-server pushes; ConfigError if it cannot serve."""
    if name in NOT_FOR_PUSHES:
        raise ConfigError(f"--compression {name} cannot serve --strategy ps: {NOT_FOR_PUSHES[name]}")
    from distlearn.comm.compression import create_compressor

    codec = create_compressor(name, **options)
    if applies_momentum(codec):
        raise ConfigError(
            f"--compression {name} with momentum cannot serve --strategy ps: its momentum correction "
            "replaces the optimizer's momentum, which here lives on the server (drop the codec's momentum "
            "option)"
        )
    return codec


def push_context(key: str, sizes: list[int]) -> BucketContext:
    """The context of a push of tensors of ``sizes`` elements to the server keyed ``key``."""
    return BucketContext(key, tuple((n,) for n in sizes))


def encode_push(codec: Codec, key: str, flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``flat`` (tensors of ``sizes`` elements back to back) encoded by ``codec`` -- its memory for ``key``
    updated, per-tensor statistics (scales, norms) per tensor -- as one self-describing byte vector."""
    payload = codec.encode(flat, push_context(key, sizes))
    return payload_to_bytes([payload.tensors[n] for n in codec.wire.names], header=True)


def decode_push(codec: Codec, wire: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The dense gradient (tensors of ``sizes`` elements) that the bytes of :func:`encode_push` stand for."""
    tensors = bytes_to_payload(wire, codec.wire.dtypes, None)
    payload = Payload(dict(zip(codec.wire.names, tensors, strict=True)))
    return codec.decode(payload, push_context("", sizes)).float()
