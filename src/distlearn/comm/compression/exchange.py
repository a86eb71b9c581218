"""The exchange of compressed buckets: :class:`Exchange` (collectives that count bytes) and
:func:`reduce_bucket`, which sends one bucket through a codec and leaves the sum over the ranks.

Bytes on the wire: :class:`Exchange` counts, at each collective, the payload bytes *this rank sends*: for an
allreduce of ``n`` bytes on ``R`` ranks the ``2 (R - 1) / R n`` of gloo's ring (the same convention as
:class:`distlearn.comm.reducers.BackendReducer`), for an all-gather of a ``b``-byte payload the ``(R - 1) b``
of a ring all-gather (including padding to the largest payload and the small length exchange of codecs
with variable-size payloads). Counted from the tensors actually handed to ``torch.distributed``.

On a GPU the exchange reads one thing on the host: for a variable-size payload (``same_size=False``) the
all-gathered lengths, one synchronisation per bucket (the receive buffers' sizes depend on them); the
payloads themselves stay on the device.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distlearn.comm.compression.base import (
    BucketContext,
    Codec,
    CollectiveCodec,
    Payload,
    bytes_to_payload,
    payload_to_bytes,
    to_device,
)
from distlearn.comm.traffic import ring_allgather_bytes, ring_allreduce_bytes
from distlearn.errors import CommError

__all__ = ["Exchange", "reduce_bucket"]


class Exchange:
    """Collectives on ``group`` with a deadline, counting the bytes this rank sends (see the module doc)."""

    def __init__(self, group: Any = None, *, timeout_s: float = 300.0) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.bytes_sent = 0
        self.messages = 0  # point-to-point messages of a ring implementation (alpha terms of the cost model)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def allreduce_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place."""
        size = self.world_size
        if size == 1 or tensor.numel() == 0:
            return tensor
        self.bytes_sent += ring_allreduce_bytes(tensor.numel(), tensor.element_size(), size)
        self.messages += 2 * (size - 1)
        self._wait(dist.all_reduce(tensor, group=self.group, async_op=True), f"allreduce of {what}")
        return tensor

    def all_gather_bytes(self, payload: torch.Tensor, what: str, *, same_size: bool) -> list[torch.Tensor]:
        """Every rank's ``uint8`` payload (this rank's included), in rank order.

        ``same_size=False`` first all-gathers the lengths and pads every payload to the largest.
        """
        size = self.world_size
        if size == 1:
            return [payload]
        lengths = [payload.numel()] * size
        if not same_size:
            mine = to_device(torch.tensor([payload.numel()], dtype=torch.int64), payload.device)
            gathered = [torch.empty_like(mine) for _ in range(size)]
            self.bytes_sent += ring_allgather_bytes(mine.numel() * mine.element_size(), size)
            self.messages += size - 1
            self._wait(dist.all_gather(gathered, mine, group=self.group, async_op=True), f"lengths of {what}")
            lengths = torch.cat(gathered).tolist()  # the one host read (synchronisation) per bucket
            longest = max(lengths)
            if payload.numel() < longest:
                payload = torch.cat([payload, payload.new_zeros(longest - payload.numel())])
        outputs = [torch.empty_like(payload) for _ in range(size)]
        self.bytes_sent += ring_allgather_bytes(payload.numel(), size)
        self.messages += size - 1
        self._wait(
            dist.all_gather(outputs, payload, group=self.group, async_op=True), f"all-gather of {what}"
        )
        return [out[:length] for out, length in zip(outputs, lengths, strict=True)]

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as error:  # gloo raises RuntimeError on a timeout or a closed connection
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CommError(
                f"rank {self.rank}: compressed gradient exchange ({what}) did not complete within "
                f"{self.timeout_s:g} s: {first}; a peer may have died or be stuck"
            ) from error


@torch.no_grad()
def reduce_bucket(
    codec: Codec, flat: torch.Tensor, context: BucketContext, exchange: Exchange
) -> torch.Tensor:
    """Replace ``flat`` by the sum over the ranks of what their payloads stand for (in place); return it.

    The caller divides by ``R`` (as for every :mod:`distlearn.comm.reducers` reducer). A summable codec's
    payload tensors are allreduced and decoded once; otherwise every rank's packed payload is all-gathered,
    and each is decoded and added (in rank order). A :class:`CollectiveCodec` runs its own exchanges.
    """
    if isinstance(codec, CollectiveCodec):
        return codec.reduce(flat, context, exchange)
    payload = codec.encode(flat, context)
    wire = codec.wire
    if codec.summable:
        for name in wire.names:
            exchange.allreduce_(payload.tensors[name], f"{codec.name} {name}")
        flat.copy_(codec.decode(payload, context))
        return flat
    data = payload_to_bytes([payload.tensors[n] for n in wire.names], header=not wire.same_size)
    received = exchange.all_gather_bytes(data, f"{codec.name} payload", same_size=wire.same_size)
    counts = [payload.tensors[n].numel() for n in wire.names] if wire.same_size else None
    total = torch.zeros_like(flat)
    for buffer in received:
        tensors = bytes_to_payload(buffer, wire.dtypes, counts)
        other = Payload(dict(zip(wire.names, tensors, strict=True)), dict(payload.meta))
        total += codec.decode(other, context)
    flat.copy_(total)
    return flat
