"""The ring allreduce (Patarasuk & Yuan 2009), plain and pipelined over segments."""

from __future__ import annotations

import functools

import torch

from distlearn.comm.reducers.base import (
    DEFAULT_TAG,
    DEFAULT_TIMEOUT_S,
    Channel,
    Message,
    Reducer,
    Rounds,
    _Op,
    chunk_bounds,
)
from distlearn.errors import ConfigError

__all__ = ["RingReducer", "SegmentedRingReducer"]

Span = tuple[int, int]


class _Segmented(Reducer):
    """A reducer that pipelines ``segment_bytes`` segments (None: one segment, the unpipelined algorithm)."""

    def __init__(
        self,
        *,
        segment_bytes: int | None = 4 << 20,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tag: int = DEFAULT_TAG,
        duplex: bool = True,
        batched: bool | None = None,
    ) -> None:
        super().__init__(timeout_s=timeout_s, tag=tag, duplex=duplex, batched=batched)
        if segment_bytes is not None and (
            not isinstance(segment_bytes, int) or isinstance(segment_bytes, bool) or segment_bytes <= 0
        ):
            raise ConfigError(
                f"{self.name}: segment_bytes must be a positive integer (e.g. 4194304 for 4 MiB), "
                f"got {segment_bytes!r}"
            )
        self.segment_bytes = segment_bytes

    def _segments(self, flat: torch.Tensor, size: int) -> tuple[list[torch.Tensor], list[list[Span]]]:
        """The ``size`` ring chunks of ``flat`` and each chunk's ``(start, stop)`` segments."""
        chunks = [flat[start:stop] for start, stop in chunk_bounds(flat.numel(), size)]
        step = None if self.segment_bytes is None else max(1, self.segment_bytes // flat.element_size())

        def segments(chunk: torch.Tensor) -> list[tuple[int, int]]:
            length = chunk.numel()
            width = length if step is None else step
            return [(a, min(a + width, length)) for a in range(0, length, max(width, 1))]

        return chunks, [segments(chunk) for chunk in chunks]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(segment_bytes={self.segment_bytes}, timeout_s={self.timeout_s:g})"


class SegmentedRingReducer(_Segmented):
    """Ring allreduce, pipelined over segments of ``segment_bytes``.

    Paper: Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC
    69(2), 2009; Thakur et al. (2005). The vector is cut into p chunks ``c_0..c_{p-1}`` (sizes differ by at
    most one). Reduce-scatter, steps s = 0..p-2: rank r sends ``c_{r-s}`` to rank r+1 and receives
    ``c_{r-s-1}`` from rank r-1, adding it into its own; after p-1 steps rank r holds the full sum of
    ``c_{r+1}``. All-gather, steps s = 0..p-2: rank r sends ``c_{r+1-s}`` and receives ``c_{r-s}`` directly
    into the tensor. Each rank sends ``2(p-1)/p n`` bytes; time ``2(p-1) alpha + 2(p-1)/p n beta +
    (p-1)/p n gamma``.

    Segmenting: each chunk is cut into segments of ``segment_bytes`` (the last one shorter); a segment is
    forwarded to the next step as soon as it is reduced, so summing segment k overlaps with receiving
    segment k+1 and the next rank starts earlier: ``p - 1`` step latencies become ``p - 1 + s - 1``
    segment latencies of ``n/(p s)`` bytes each. ``segment_bytes=None`` is the plain ring.

    Args:
        segment_bytes: bytes per pipelined segment (rounded down to whole elements, at least one element),
            or None for one segment per chunk.
    """

    name = "segmented-ring"

    def _rounds(self, flat: torch.Tensor, channel: Channel) -> Rounds:
        """The ring as batched rounds, pipelined as a wavefront: with the ``2(p-1)`` steps numbered
        ``s = 0..2p-3`` (reduce-scatter, then all-gather), segment ``k`` of step ``s`` travels in round
        ``s + k``. It needs segment ``k`` of step ``s - 1``, received and added in round ``s + k - 1``, and
        both ends of a message compute the same round. Reduce-scatter receives land in a buffer at their
        chunk's offset (the chunks received in one round differ), all-gather ones in the tensor."""
        size, rank = channel.size, channel.rank
        right, left = (rank + 1) % size, (rank - 1) % size
        chunks, plans = self._segments(flat, size)
        incoming = self._buffer(flat.dtype, flat.numel(), flat.device).split([c.numel() for c in chunks])
        rounds: Rounds = {}
        for s in range(2 * (size - 1)):
            gather = s >= size - 1
            t = s - (size - 1) if gather else s  # the step within its phase
            sent = (rank + 1 - t if gather else rank - t) % size  # the chunk sent in this step
            got = (rank - t if gather else rank - t - 1) % size  # the chunk received
            phase = "all-gather" if gather else "reduce-scatter"
            for k, (a, b) in enumerate(plans[sent]):
                label = _label(sent, k, len(plans[sent]), phase, t)
                rounds.setdefault(s + k, []).append(Message(True, chunks[sent][a:b], right, label))
            for k, (a, b) in enumerate(plans[got]):
                label = _label(got, k, len(plans[got]), phase, t)
                if gather:
                    message = Message(False, chunks[got][a:b], left, label)
                else:
                    into = incoming[got][a:b]
                    add = functools.partial(chunks[got][a:b].add_, into)
                    message = Message(False, into, left, label, add)
                rounds.setdefault(s + k, []).append(message)
        return rounds

    def _reduce(self, flat: torch.Tensor, channel: Channel) -> None:
        size, rank = channel.size, channel.rank
        right, left = (rank + 1) % size, (rank - 1) % size
        chunks, plans = self._segments(flat, size)
        longest = chunks[0].numel()  # chunk 0 is the longest
        received = self._buffer(flat.dtype, (2 if size > 2 else 1) * longest, flat.device)
        rs_recv: dict[tuple[int, int], _Op] = {}
        rs_send: dict[tuple[int, int], _Op] = {}
        ag_recv: dict[tuple[int, int], _Op] = {}
        sends: list[_Op] = []

        def what(chunk: int, k: int, phase: str, s: int) -> str:
            return _label(chunk, k, len(plans[chunk]), phase, s)

        def post_rs_recv(s: int, k: int) -> None:
            chunk = (rank - s - 1) % size
            a, b = plans[chunk][k]
            half = received[(s % 2) * longest :]
            rs_recv[s, k] = channel.irecv(half[a:b], left, what(chunk, k, "reduce-scatter", s))

        def post_rs_send(s: int, k: int) -> None:
            chunk = (rank - s) % size
            a, b = plans[chunk][k]
            rs_send[s, k] = op = channel.isend(chunks[chunk][a:b], right, what(chunk, k, "reduce-scatter", s))
            sends.append(op)

        def post_ag_send(s: int, k: int) -> None:
            chunk = (rank + 1 - s) % size
            a, b = plans[chunk][k]
            sends.append(channel.isend(chunks[chunk][a:b], right, what(chunk, k, "all-gather", s)))

        def post_ag_recv(s: int, k: int) -> None:
            # c_{r-s} was sent in reduce-scatter step s; that send must be done before we overwrite it
            chunk = (rank - s) % size
            channel.wait(rs_send.pop((s, k)))
            a, b = plans[chunk][k]
            ag_recv[s, k] = channel.irecv(chunks[chunk][a:b], left, what(chunk, k, "all-gather", s))

        # Messages between two ranks are matched in the order they are posted (per tag), so every rank
        # posts its receives from the left in (phase, step, segment) order, as its left neighbour sends them.
        for k in range(len(plans[(rank - 1) % size])):
            post_rs_recv(0, k)
        for k in range(len(plans[rank])):
            post_rs_send(0, k)
        # Each receive is posted one step ahead (before waiting for the current one), so a neighbour's send
        # never waits for our "ready to receive" notice; reduce-scatter receives alternate between two
        # halves of the buffer for that.
        for s in range(size - 1):
            chunk = (rank - s - 1) % size  # the chunk reduced in this step
            last = s == size - 2
            following = rank if last else (rank - s - 2) % size  # the chunk received next
            half = received[(s % 2) * longest :]
            post_next = functools.partial(post_ag_recv, 0) if last else functools.partial(post_rs_recv, s + 1)
            for k, (a, b) in enumerate(plans[chunk]):
                if k < len(plans[following]):
                    post_next(k)
                channel.wait(rs_recv.pop((s, k)))
                chunks[chunk][a:b].add_(half[a:b])
                if last:  # c_{r+1} is now complete: it is what all-gather step 0 sends
                    post_ag_send(0, k)
                else:
                    post_rs_send(s + 1, k)
            for k in range(len(plans[chunk]), len(plans[following])):
                post_next(k)
        for s in range(size - 1):
            chunk = (rank - s) % size  # the chunk received in this step
            last = s == size - 2
            following = (rank - s - 1) % size
            for k in range(len(plans[chunk])):
                if not last and k < len(plans[following]):
                    post_ag_recv(s + 1, k)
                channel.wait(ag_recv.pop((s, k)))
                if not last:
                    post_ag_send(s + 1, k)
            if not last:
                for k in range(len(plans[chunk]), len(plans[following])):
                    post_ag_recv(s + 1, k)
        for op in sends:
            if op.work is not None and not op.work.is_completed():
                channel.wait(op)
        assert not rs_recv and not ag_recv


class RingReducer(SegmentedRingReducer):
    """Ring allreduce: reduce-scatter then all-gather, ``2(p-1)`` steps of one chunk each.

    The :class:`SegmentedRingReducer` with one segment per chunk (see there for the steps and the cost).
    Bandwidth-optimal: each rank sends ``2(p-1)/p n`` bytes whatever p is; the latency term grows with p.
    """

    name = "ring"

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tag: int = DEFAULT_TAG,
        duplex: bool = True,
        batched: bool | None = None,
    ) -> None:
        super().__init__(segment_bytes=None, timeout_s=timeout_s, tag=tag, duplex=duplex, batched=batched)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timeout_s={self.timeout_s:g})"


def _label(chunk: int, k: int, segments: int, phase: str, step: int) -> str:
    part = f" segment {k}" if segments > 1 else ""
    return f"chunk {chunk}{part} ({phase} step {step})"
