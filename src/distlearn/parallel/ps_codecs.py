"""Gradient codecs for parameter-server pushes: which codecs can serve them, and the byte format of a push.

A push is encoded on the worker (the codec keeps its error-feedback residual per server, ``key``) and
decoded on the server before its optimizer sees it; see "compressed pushes" in :mod:`distlearn.parallel.ps`.
"""

from __future__ import annotations

from typing import Any

import torch

from distlearn.comm.compression import push
from distlearn.comm.compression.push import create_push_codec

__all__ = ["decode_push", "encode_push", "make_push_codec"]

def make_push_codec(name: str, options: dict[str, Any]) -> Any:
    """The codec ``name`` for parameter-server pushes; ConfigError if it cannot serve them (and why)."""
    return create_push_codec(name, options)


def encode_push(codec: Any, key: str, flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The worker's side of the push adapter: :func:`distlearn.comm.compression.push.encode_push`."""
    return push.encode_push(codec, key, flat, sizes)


def decode_push(codec: Any, wire: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The server's side of the push adapter: :func:`distlearn.comm.compression.push.decode_push`."""
    return push.decode_push(codec, wire, sizes)
