"""The shared-memory allreduce for ranks on one host (``shm``): reduce-scatter and all-gather through
segments every rank maps, synchronised by flags in shared memory.

Setup, once per reducer and group (the only c10d traffic): every rank creates a data segment (``slots``
staging slots of ``R`` blocks of ``piece_bytes``), the group's rank 0 also a control segment (int64 flags),
the names are exchanged with ``all_gather_object``, every rank maps its peers' segments, and after a second
``all_gather_object`` (a barrier) each creator removes its names (:mod:`distlearn.comm.shm_segments`: a rank
killed later leaves nothing behind; stale files of dead pids are removed at the next setup). A peer segment
that is not visible here means the ranks do not share a host (or a ``/dev/shm``): :class:`ConfigError`.

One allreduce of ``n`` elements on ``R`` ranks: chunk ``c`` is ``chunk_bounds(n, R)[c]``, owned by rank
``c``; chunks are processed in *pieces* of ``piece_bytes`` (per chunk), so the staging memory is bounded
and a piece stays in cache between its copies. For piece ``k`` (sequence number ``s``, slot ``s mod
slots``), rank ``r``:

1. waits until every peer is DONE with sequence ``s - slots`` (its slot is free again), copies piece ``k``
   of every chunk but its own into its slot, sets ARRIVED = ``s``;
2. waits for every peer's ARRIVED >= ``s``, sums piece ``k`` of its own chunk as ``x_r + x_q`` for the
   other ranks q in rank order (its own input, then the peers' slots; the same order in every call, so the
   same bits every time, and only the owner sums, so every rank gets the owner's bits), writes the sum to
   its slot and to its tensor, sets REDUCED = ``s``;
3. waits for every peer's REDUCED >= ``s``, copies the other chunks' sums from the owners' slots into its
   tensor, sets DONE = ``s``. Step 3 of piece ``k - 1`` runs between steps 1 and 2 of piece ``k``.

Memory traffic per rank (bytes read + written, in units of n): copy-in 2 (R-1)/R, the sum (R + 2)/R, the
copy back 2 (R-1)/R: for R = 2 about 3 n, 1.5 times a memcpy's 2 n. A tensor returned by
:meth:`ShmReducer.shared_buffer` (or a contiguous view of one) already lies in memory the peers have mapped:
its allreduce reads the peers' data in place (no copy-in), sums into the owner's own chunk and copies the
other chunks back: (R + 1)/R + 2 (R-1)/R, 2.5 n for R = 2 (1.25 memcpy), then a barrier (every peer done
reading) before it returns. Every rank must use the same buffer (same offset and length) in the same call.

Memory order: data is written by torch, then the flag by a Python store; a peer that sees the flag must see
the data. That holds on x86-64 (TSO: stores become visible in program order, and torch's worker threads end
with a barrier); other architectures would need fences, so the reducer refuses to run there (ConfigError).

Waiting: a spin on the flags (about 0.1 us a read), then ``os.sched_yield``, then sleeps growing to 1 ms,
so that more ranks than cores still progress; on the slow path the deadline (``timeout_s``, per reducer or
per call) is checked, and the lagging ranks' pids (in the control segment): a dead peer is named within
about 20 ms, a live one that does not arrive after ``timeout_s``, in a :class:`CommError`. After an error the
reducer's state for the group is broken; later calls on it raise at once.

``bytes_sent`` counts the bytes of this rank's data that its peers read: its contribution to each other
chunk ((n - n_r) elements) plus its reduced chunk once per peer ((R - 1) n_r), where ``n_r`` is its chunk's
length; over the ranks that is the ``2 (R-1) n`` of any bandwidth-optimal allreduce, as the ring counts.
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
        piece_bytes: int = 256 << 10,
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
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"{self.name}: timeout_s must be positive, got {timeout_s!r}")
        if not dist.is_initialized():
            raise CommError(
                f"{self.name} {op}: no process group; call distlearn.launch.init_distributed() "
                "(or torch.distributed.init_process_group) first"
            )
        if tensor.device.type != "cpu":
            raise ConfigError(
                f"{self.name} {op}: the shared-memory reducer works on CPU tensors, got one on "
                f"{tensor.device}; "
                "use --reducer backend (NCCL) for GPU tensors"
            )
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
        bounds = chunk_bounds(n, state.size)
        if state.size > 1 and n > 0:
            try:
                index = state.buffer_of.get(flat.untyped_storage().data_ptr())
                if index is not None and op == "allreduce":
                    self._in_place(state, flat, index, bounds, timeout)
                else:
                    self._staged(state, flat, bounds, timeout, op)
            except CommError as error:
                state.broken = str(error)
                raise
            start, stop = bounds[state.rank]
            mine = stop - start
            sent = {
                "allreduce": (n - mine) + (state.size - 1) * mine,
                "reduce-scatter": n - mine,
                "all-gather": (state.size - 1) * mine,
            }[op]
            self.bytes_sent += sent * flat.element_size()
        if work is not tensor:
            tensor.copy_(work)
        return bounds[state.rank]

    def _staged(
        self, state: ShmGroup, flat: torch.Tensor, bounds: list[tuple[int, int]], timeout: float, op: str
    ) -> None:
        size, rank, words = state.size, state.rank, state.words
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
            words[DONE * size + rank] = seq

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
                words[ARRIVED * size + rank] = seq
            else:  # all-gather only: publish the own shard
                if b > a:
                    block(rank, seq, rank, b - a).copy_(flat[a:b])
                words[ARRIVED * size + rank] = seq
                words[REDUCED * size + rank] = seq
            if gather and k > 0:
                finish(k - 1)
            if reduce:
                state.wait(ARRIVED, seq, "copy in its data", op, timeout)
                if k == 0:
                    state.check_calls(first, op)
                if b > a:
                    mine = flat[a:b]
                    if gather:
                        out = block(rank, seq, rank, b - a)
                        torch.add(mine, block(state.peers[0], seq, rank, b - a), out=out)
                        for q in state.peers[1:]:
                            out.add_(block(q, seq, rank, b - a))
                        mine.copy_(out)
                    else:
                        for q in state.peers:
                            mine.add_(block(q, seq, rank, b - a))
                words[REDUCED * size + rank] = seq
                if not gather:
                    words[DONE * size + rank] = seq
            elif k == 0:
                state.wait(ARRIVED, first, "publish its shard", op, timeout)
                state.check_calls(first, op)
        if gather:
            finish(pieces - 1)

    def _in_place(
        self, state: ShmGroup, flat: torch.Tensor, index: int, bounds: list[tuple[int, int]], timeout: float
    ) -> None:
        """Allreduce of a tensor in this rank's shared buffer ``index``: peers read it where it lies."""
        size, rank, words = state.size, state.rank, state.words
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
        words[ARRIVED * size + rank] = last
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
                for q in state.peers:
                    mine.add_(views[q][a:b])
            words[REDUCED * size + rank] = first + k
            if k > 0:
                finish(k - 1)
        finish(pieces - 1)
        words[DONE * size + rank] = last
        state.wait(DONE, last, "finish reading this rank's buffer", "allreduce", timeout)

    # ---- setup --------------------------------------------------------------------------------------

    def _state(self, group: Any, timeout_s: float | None) -> ShmGroup:
        key = dist.group.WORLD if group is None else group
        state = self._groups.get(key)
        if state is None:
            state = self._groups[key] = ShmGroup.open(group, self.piece_bytes, self.name)
        return state
