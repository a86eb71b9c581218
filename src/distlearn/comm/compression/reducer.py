"""The bucketer's adapter: a codec behind the :class:`distlearn.comm.reducers.Reducer` interface, so the
gradient bucketer (and anything else that sums tensors with a reducer) sends compressed buckets without
knowing it.

:class:`CompressedReducer` runs each call on the reducer's worker thread, in issue order (the base class),
and there sends the flat bucket through :func:`~.exchange.reduce_bucket` with an :class:`~.exchange.Exchange`
on the call's :class:`~distlearn.comm.reducers.Channel` group. The bucketer registers its buckets first
(:meth:`CompressedReducer.register`), so the codec is told which bucket a buffer is (its memory's key) and
the parameter shapes inside it (per-tensor scales, PowerSGD's matrices); an unregistered tensor is one
bucket holding one flat parameter, keyed by its length. The context's ``world_size`` and rank are the
group's; ``seed`` is the run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distlearn.comm.compression.base import BucketContext, Codec, stream_seed
from distlearn.comm.compression.exchange import Exchange, reduce_bucket
from distlearn.comm.reducers import Channel, Reducer

__all__ = ["CompressedReducer"]


class CompressedReducer(Reducer):
    """Sums tensors across the group through ``codec`` (lossy; see the codec); counts bytes sent.

    Args:
        codec: the codec (with its memory wrappers), e.g. from
            :func:`distlearn.comm.compression.create_compressor`.
        seed: the run's seed, the same on every rank (random-k's index sets, PowerSGD's first ``Q``, and with
            the rank each rank's random stream).
        timeout_s: deadline of every collective.
    """

    name = "compressed"
    point_to_point = False

    def __init__(self, codec: Codec, *, seed: int = 0, timeout_s: float = 300.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self.codec = codec
        self.seed = seed
        self._layouts: dict[int, tuple[str, tuple[tuple[int, ...], ...]]] = {}
        self.messages = 0

    @property
    def compressor(self) -> Codec:
        """The codec (its former name)."""
        return self.codec

    def __repr__(self) -> str:
        return f"CompressedReducer({self.codec.describe()})"

    def register(self, buffer: torch.Tensor, key: str, shapes: Sequence[Sequence[int]]) -> None:
        """Declare that ``buffer`` (a persistent flat bucket) is bucket ``key`` with tensors of ``shapes``."""
        self._layouts[buffer.data_ptr()] = (key, tuple(tuple(s) for s in shapes))

    def context(self, flat: torch.Tensor, exchange: Exchange) -> BucketContext:
        """What the codec is told about ``flat`` on ``exchange`` 's group."""
        key, shapes = self._layouts.get(flat.data_ptr(), (f"flat{flat.numel()}", ((flat.numel(),),)))
        return BucketContext(
            key, shapes, world_size=exchange.world_size, seed=self.seed,
            stream_seed=stream_seed(self.seed, exchange.rank),
        )  # fmt: skip

    def reduce_bucket(self, flat: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        """Replace ``flat`` by the sum over the ranks through the codec (what every call runs); counts bytes.

        Outside a job (no process group) ``Exchange()`` is a group of one: the codec's own round trip.
        """
        try:
            return reduce_bucket(self.codec, flat, self.context(flat, exchange), exchange)
        finally:
            self.bytes_sent += exchange.bytes_sent
            self.messages += exchange.messages

    def _reduce(self, flat: torch.Tensor, channel: Channel) -> None:
        self.reduce_bucket(flat, Exchange(channel.group, timeout_s=channel.timeout_s))

    def state_dict(self) -> dict[str, Any]:
        return self.codec.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.codec.load_state_dict(state)
