"""A codec behind the :class:`distlearn.comm.reducers.Reducer` interface, so the gradient bucketer (and
anything else that sums tensors with a reducer) sends compressed buckets without knowing it.

:class:`CompressedReducer` runs each call on the reducer's worker thread, in issue order (the base class),
and there hands the flat bucket to :meth:`Compressor.reduce` with an :class:`Exchange` on the same group.
The bucketer registers its buckets first (:meth:`CompressedReducer.register`), so the codec knows which
bucket a buffer is (its residual) and the parameter shapes inside it (per-tensor scales, PowerSGD's
matrices); an unregistered tensor is one bucket holding one flat parameter, keyed by its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distlearn.comm.compression.base import Compressor, Exchange
from distlearn.comm.reducers import Reducer, _Channel

__all__ = ["CompressedReducer"]


class CompressedReducer(Reducer):
    """Sums tensors across the group through ``compressor`` (lossy; see the codec); counts bytes sent."""

    name = "compressed"
    point_to_point = False

    def __init__(self, compressor: Compressor, *, timeout_s: float = 300.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self.compressor = compressor
        self._layouts: dict[int, tuple[str, list[tuple[int, ...]]]] = {}
        self.messages = 0

    def __repr__(self) -> str:
        return f"CompressedReducer({self.compressor.describe()})"

    def register(self, buffer: torch.Tensor, key: str, shapes: Sequence[Sequence[int]]) -> None:
        """Declare that ``buffer`` (a persistent flat bucket) is bucket ``key`` with tensors of ``shapes``."""
        self._layouts[buffer.data_ptr()] = (key, [tuple(s) for s in shapes])

    def _reduce(self, flat: torch.Tensor, channel: _Channel) -> None:
        key, shapes = self._layouts.get(flat.data_ptr(), (f"flat{flat.numel()}", [(flat.numel(),)]))
        exchange = Exchange(channel.group, timeout_s=channel.timeout_s)
        try:
            self.compressor.reduce(key, flat, shapes, exchange)
        finally:
            self.bytes_sent += exchange.bytes_sent
            self.messages += exchange.messages

    def state_dict(self) -> dict[str, Any]:
        return self.compressor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state)
