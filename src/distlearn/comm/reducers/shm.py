"""The shared-memory allreduce for ranks on one host (``shm``): reduce-scatter and all-gather through
segments every rank maps, synchronised by flags in shared memory.

Setup, once per reducer and group (the only c10d traffic; :mod:`distlearn.comm.reducers.shm_group`):
every rank creates a staging segment (3 slots of R blocks of ``piece_bytes``), the group's rank 0 also a
control segment (int64 flags), the names are exchanged with ``all_gather_object``, every rank maps its peers'
segments, and after a second exchange (a barrier) each creator removes its names
(:mod:`distlearn.comm.shm_segments`: a rank killed later leaves nothing behind; files of dead pids are
removed at the next setup). A peer's segment that is not visible means the ranks do not share a host (or a
``/dev/shm``): :class:`ConfigError`, naming ``--reducer hierarchical``.

One allreduce of ``n`` elements on ``R`` ranks: chunk ``c`` is ``chunk_bounds(n, R)[c]``, owned by rank
``c``, processed in *pieces* of ``piece_bytes`` (default 2 MiB per chunk), so the staging memory is bounded
and a piece is still in cache for its next copy. For piece ``k`` (sequence number ``s``, slot ``s mod 3``),
rank ``r``:

1. waits until every peer is DONE with ``s - 3`` (its slot is free again), copies piece ``k`` of every chunk
   but its own into its slot, sets ARRIVED = ``s``;
2. waits for every peer's ARRIVED >= ``s``, sums piece ``k`` of chunk ``r`` as ``x_0 + x_1 + ... +
   x_{R-1}`` (rank order, its own input in place of ``x_r``) into its slot and its tensor, sets REDUCED;
3. waits for every peer's REDUCED >= ``s``, copies the other chunks' sums from their owners' slots into its
   tensor, sets DONE = ``s``. Step 3 of piece ``k - 1`` runs between steps 1 and 2 of piece ``k``.

Every path sums in rank order and only one rank sums each element, so every rank gets the same bits, and
the same bits whatever the path or the piece size. Tensors up to 32 KiB take a one-hand-off path instead:
each rank copies all of its tensor into its slot, sets ARRIVED, and once all have arrived sums all R copies
itself (one wait instead of two; R n read instead of 2 (R-1)/R n, which is nothing at that size).

Memory traffic per rank (bytes read + written, in units of n): copy-in 2 (R-1)/R, the sum (R + 2)/R, the
copy back 2 (R-1)/R: about 3 n for R = 2, 1.5 memory copies (a copy moves 2 n). A tensor returned by
:meth:`ShmReducer.shared_buffer` (or a contiguous view of one, the same on every rank) already lies in
memory the peers have mapped: its allreduce reads the peers' data in place (no copy-in), sums into its own
chunk and copies the other chunks back: (R + 1)/R + 2 (R-1)/R, 2.5 n for R = 2 (1.25 copies), then waits
until every peer is done reading its buffer before it returns. The gradient bucketer
(:mod:`distlearn.comm.bucketing`) takes its bucket buffers from ``shared_buffer`` when the reducer has one.
Each call's length, dtype and buffer are compared across ranks at its first hand-off: a mismatch is a
:class:`CommError` naming both calls.

A tensor on another device (a CUDA bucket) is copied to the host, reduced there and copied back.

Memory order: data is written by torch, then the flag by a Python store; a peer that sees the flag must see
the data. That holds on x86-64 (TSO: stores become visible in program order, and torch's worker threads end
with a barrier); other architectures would need fences, so the reducer refuses to run there (ConfigError).

Waiting: about 400 reads of the flag (0.1 us each), then a sleep in the kernel on
the flag's word (``FUTEX_WAIT``, at most 2 ms; a rank that sets a flag while a peer sleeps wakes it with
``FUTEX_WAKE``), so that ranks on a busy or oversubscribed machine give their core away. Every 20 ms the
deadline (``timeout_s``, per reducer or per call) and the lagging ranks' pids are checked: a dead peer is
named within about 20 ms, a live one that does not arrive after ``timeout_s``, in a :class:`CommError`.
After an error the reducer's state for the group is broken; later calls on it raise at once.

``bytes_sent`` counts the bytes of this rank's data that the bandwidth-optimal exchange makes its peers
read: its part of every other chunk ((n - n_r) elements) plus its summed chunk once per peer
((R - 1) n_r), ``n_r`` its chunk's length; over the ranks that is the ``2 (R-1) n`` of the ring. The
one-hand-off path is counted the same (so the count does not depend on the size threshold).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distlearn.comm.reducers.base import DEFAULT_TAG, DEFAULT_TIMEOUT_S, Reducer, _check_tensor, chunk_bounds
from distlearn.comm.reducers.shm_group import ARRIVED, DONE, REDUCED, SLOTS, ShmGroup
from distlearn.errors import CommError, ConfigError

__all__ = ["ShmReducer"]

ONE_SHOT_BYTES = 32 << 10
"""Tensors up to this size (and one slot) take the one-hand-off path: each rank sums every rank's copy."""


class ShmReducer(Reducer):
    """Allreduce through shared memory among ranks of one host (see the module docstring).

    Args:
        piece_bytes: bytes of each chunk processed at a time (staging memory per rank: ``3 R piece_bytes``).
        timeout_s: deadline of each wait for the peers (seconds); a call's ``timeout_s`` overrides it.
        tag, duplex, batched: accepted for the common interface; unused (no point-to-point messages).
    """

    name = "shm"
    point_to_point = False

    def __init__(
        self,
        *,
        piece_bytes: int = 2 << 20,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tag: int = DEFAULT_TAG,
        duplex: bool = True,
        batched: bool | None = None,
    ) -> None:
        super().__init__(timeout_s=timeout_s, tag=tag, duplex=duplex, batched=batched)
        if (
            not isinstance(piece_bytes, int)
            or isinstance(piece_bytes, bool)
            or not 64 <= piece_bytes <= 1 << 30
        ):
            raise ConfigError(
                f"shm: piece_bytes must be an integer between 64 and 2**30 (e.g. 262144), got {piece_bytes!r}"
            )
        self.piece_bytes = piece_bytes // 8 * 8
        self.one_shot_bytes = ONE_SHOT_BYTES
        self._groups: dict[Any, ShmGroup] = {}

    def __repr__(self) -> str:
        return f"ShmReducer(piece_bytes={self.piece_bytes}, timeout_s={self.timeout_s:g})"

    # ---- public API beyond Reducer --------------------------------------------------------------------

    def shared_buffer(
        self, numel: int, dtype: torch.dtype = torch.float32, group: Any = None
    ) -> torch.Tensor:
        """A zeroed tensor of ``numel`` elements in a segment every rank of ``group`` has mapped.

        Collective: every rank calls it with the same arguments, in the same order. An allreduce on it (or
        on a contiguous view of it, the same view on every rank) reads the peers' data in place.
        """
        if not isinstance(numel, int) or numel < 0:
            raise ConfigError(f"shm: shared_buffer needs a non-negative number of elements, got {numel!r}")
        return self._state(group, None).new_buffer(group, numel, dtype)

    def reduce_scatter_(
        self, flat: torch.Tensor, group: Any = None, *, timeout_s: float | None = None
    ) -> tuple[int, int]:
        """Leave on this rank the sum over the group of its shard ``chunk_bounds(flat.numel(), R)[rank]``
        of ``flat`` and return that shard's ``(start, stop)``; the other elements are left unspecified."""
        _check_tensor(flat, self.name)
        result = self._ordered(lambda: self._collective(flat, group, timeout_s, "reduce-scatter"))
        return result

    def all_gather_(self, flat: torch.Tensor, group: Any = None, *, timeout_s: float | None = None) -> None:
        """Every rank contributes ``flat[its shard]`` (as :meth:`reduce_scatter_`); afterwards every rank's
        ``flat`` holds every shard."""
        _check_tensor(flat, self.name)
        self._ordered(lambda: self._collective(flat, group, timeout_s, "all-gather"))

    # ---- Reducer hooks --------------------------------------------------------------------------------

    def _prepare(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> None:
        if dist.is_initialized():
            self._state(group, timeout_s)  # the collective setup in the caller's thread

    def _run(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> torch.Tensor:
        self._collective(tensor, group, timeout_s, "allreduce")
        return tensor

    # ---- the algorithm --------------------------------------------------------------------------------

    def _ordered(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` after this reducer's outstanding asynchronous calls (on its worker thread if any)."""
        with self._lock:
            pending = self._pending
            if pending and self._jobs is not None and self._thread is not None and self._thread.is_alive():
                future: torch.futures.Future = torch.futures.Future()
                self._pending += 1
                self._jobs.put((call, future, self._done, contextlib.nullcontext))
            else:
                future = None
        return call() if future is None else future.wait()

    def _collective(self, tensor: torch.Tensor, group: Any, timeout_s: float | None, op: str) -> Any:
        self._check_call(timeout_s, op)
        if tensor.device.type != "cpu":  # e.g. a CUDA bucket: summed through a host copy
            host = tensor.detach().to("cpu")
            result = self._collective(host, group, timeout_s, op)
            tensor.copy_(host)
            return result
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        state = self._state(group, timeout)
        n = tensor.numel()
        if state.broken is not None:
            raise CommError(
                f"{self.name} {op}: rank {state.rank}: an earlier call failed ({state.broken}); "
                "the group's shared state is undefined: create a new reducer and process group"
            )
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        flat = work.view(-1)
        size, rank = state.size, state.rank
        if size > 1 and n > 0:
            try:
                index = state.buffer_of.get(flat.untyped_storage().data_ptr()) if state.buffer_of else None
                if op == "allreduce" and n * flat.element_size() <= min(
                    self.one_shot_bytes, size * self.piece_bytes
                ):  # (a small shared tensor too: one hand-off beats the zero-copy path's three)
                    self._one_shot(state, flat, timeout)
                elif index is not None and op == "allreduce":
                    self._in_place(state, flat, index, chunk_bounds(n, size), timeout)
                else:
                    self._staged(state, flat, chunk_bounds(n, size), timeout, op)
            except CommError as error:
                state.broken = str(error)
                raise
            base, extra = divmod(n, size)
            mine = base + (1 if rank < extra else 0)  # this rank's chunk length (chunk_bounds)
            if op == "allreduce":
                self.bytes_sent += ((n - mine) + (size - 1) * mine) * flat.element_size()
            else:
                self.bytes_sent += (
                    n - mine if op == "reduce-scatter" else (size - 1) * mine
                ) * flat.element_size()
        if work is not tensor:
            tensor.copy_(work)
        return chunk_bounds(n, size)[rank] if op == "reduce-scatter" else None

    def _staged(
        self, state: ShmGroup, flat: torch.Tensor, bounds: list[tuple[int, int]], timeout: float, op: str
    ) -> None:
        size, rank = state.size, state.rank
        p = max(1, self.piece_bytes // flat.element_size())
        pieces = -(-(bounds[0][1] - bounds[0][0]) // p)
        slots = state.slots(flat.dtype)
        first = state.seq + 1
        state.seq += pieces
        gather = op != "reduce-scatter"
        reduce = op != "all-gather"

        def ranges(k: int) -> list[tuple[int, int]]:
            out = []
            for start, stop in bounds:
                a = min(start + k * p, stop)
                out.append((a, min(a + p, stop)))
            return out

        def block(q: int, seq: int, c: int, length: int) -> torch.Tensor:
            offset = ((seq % SLOTS) * size + c) * p
            return slots[q][offset : offset + length]

        def finish(k: int) -> None:  # step 3 of piece k
            seq = first + k
            state.wait(REDUCED, seq, "publish its reduced chunk", op, timeout)
            for c, (a, b) in enumerate(ranges(k)):
                if c != rank and b > a:
                    flat[a:b].copy_(block(c, seq, c, b - a))
            state.set(DONE, seq)

        for k in range(pieces):
            seq = first + k
            piece = ranges(k)
            if k == 0:
                state.begin(first, -1, 0, flat, op, timeout)
            else:
                state.wait(DONE, seq - SLOTS, "free its staging slot", op, timeout)
            a, b = piece[rank]
            if reduce:
                for c, (x, y) in enumerate(piece):
                    if c != rank and y > x:
                        block(rank, seq, c, y - x).copy_(flat[x:y])
                state.set(ARRIVED, seq)
            else:  # all-gather only: publish the own shard
                if b > a:
                    block(rank, seq, rank, b - a).copy_(flat[a:b])
                state.set(ARRIVED, seq)
                state.set(REDUCED, seq)
            if gather and k > 0:
                finish(k - 1)
            if reduce:
                state.wait(ARRIVED, seq, "copy in its data", op, timeout)
                if k == 0:
                    state.check_calls(first, op)
                if b > a:
                    mine = flat[a:b]
                    out = block(rank, seq, rank, b - a)
                    _sum([mine if q == rank else block(q, seq, rank, b - a) for q in range(size)], out)
                    mine.copy_(out)
                state.set(REDUCED, seq)
                if not gather:
                    state.set(DONE, seq)
            elif k == 0:
                state.wait(ARRIVED, first, "publish its shard", op, timeout)
                state.check_calls(first, op)
        if gather:
            finish(pieces - 1)

    def _one_shot(self, state: ShmGroup, flat: torch.Tensor, timeout: float) -> None:
        """A small allreduce in one hand-off: every rank copies all of its tensor into its slot and sums
        every rank's slot itself, in rank order (the order of the other paths, so the same bits)."""
        seq = state.seq = state.seq + 1
        state.begin(seq, -1, 0, flat, "allreduce", timeout)
        key = (flat.dtype, flat.numel(), seq % SLOTS)
        sources = state.views.get(key)
        if sources is None:
            if len(state.views) > 64:
                state.views.clear()
            start = (seq % SLOTS) * state.size * max(1, self.piece_bytes // flat.element_size())
            sources = [view[start : start + flat.numel()] for view in state.slots(flat.dtype)]
            state.views[key] = sources
        sources[state.rank].copy_(flat)
        state.set(ARRIVED, seq)
        state.wait(ARRIVED, seq, "copy in its data", "allreduce", timeout)
        state.check_calls(seq, "allreduce")
        _sum(sources, flat)
        state.words[REDUCED * state.size + state.rank] = seq
        state.set(DONE, seq)

    def _in_place(
        self, state: ShmGroup, flat: torch.Tensor, index: int, bounds: list[tuple[int, int]], timeout: float
    ) -> None:
        """Allreduce of a tensor in this rank's shared buffer ``index``: peers read it where it lies."""
        rank = state.rank
        offset = flat.storage_offset() * flat.element_size()
        nbytes = flat.numel() * flat.element_size()
        views = [
            segments.data[offset : offset + nbytes].view(flat.dtype) for segments in state.buffers[index]
        ]
        p = max(1, self.piece_bytes // flat.element_size())
        start, stop = bounds[rank]
        pieces = max(1, -(-(bounds[0][1] - bounds[0][0]) // p))
        first = state.seq + 1
        last = state.seq = state.seq + pieces
        state.begin(first, index, offset, flat, "allreduce", timeout)
        state.set(ARRIVED, last)
        state.wait(ARRIVED, last, "have its buffer ready", "allreduce", timeout)
        state.check_calls(first, "allreduce")

        def finish(k: int) -> None:
            state.wait(REDUCED, first + k, "publish its reduced chunk", "allreduce", timeout)
            for c, (lo, hi) in enumerate(bounds):
                a = min(lo + k * p, hi)
                b = min(a + p, hi)
                if c != rank and b > a:
                    flat[a:b].copy_(views[c][a:b])

        for k in range(pieces):
            a = min(start + k * p, stop)
            b = min(a + p, stop)
            if b > a:
                mine = flat[a:b]
                if rank < 2:  # the sum may overwrite x_0 or x_1 once both are read
                    _sum([view[a:b] for view in views], mine)
                else:
                    out = self._buffer(flat.dtype, b - a, flat.device)
                    _sum([view[a:b] for view in views], out)
                    mine.copy_(out)
            state.set(REDUCED, first + k)
            if k > 0:
                finish(k - 1)
        finish(pieces - 1)
        state.set(DONE, last)
        state.wait(DONE, last, "finish reading this rank's buffer", "allreduce", timeout)

    # ---- setup --------------------------------------------------------------------------------------

    def _state(self, group: Any, timeout_s: float | None) -> ShmGroup:
        key = dist.group.WORLD if group is None else group
        state = self._groups.get(key)
        if state is None:
            state = self._groups[key] = ShmGroup.open(group, self.piece_bytes, self.name)
        return state


def _sum(sources: list[torch.Tensor], out: torch.Tensor) -> None:
    """``out = sources[0] + sources[1] + ...``, always in rank order (``out`` may alias sources 0 or 1)."""
    torch.add(sources[0], sources[1], out=out)
    for source in sources[2:]:
        out.add_(source)
