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
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distlearn.comm.reducers.base import (
    DEFAULT_TAG,
    DEFAULT_TIMEOUT_S,
    Reducer,
    _backend_message,
    _check_tensor,
    chunk_bounds,
)
from distlearn.comm.shm_segments import Segment, directory, job_id, pid_alive, remove_stale
from distlearn.errors import CommError, ConfigError

__all__ = ["ShmReducer"]

SLOTS = 3
ARRIVED, REDUCED, DONE, PIDS = range(4)
CALL_FIELDS = 5  # first sequence number, shared buffer index (-1: none), byte offset, numel, dtype code
ROWS = 4 + CALL_FIELDS * SLOTS
"""Control segment: ``ROWS`` rows of R int64 words, word ``row * R + rank`` written only by ``rank``; a call
is described in the rows of the slot of its first sequence number (so a description is not overwritten
before every peer has compared it, see :meth:`ShmReducer._begin`)."""

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.int16,
    torch.int8,
    torch.uint8,
]
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 100


class _Group:
    """This rank's mapped segments and counters for one process group."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size
        self.peers = [q for q in range(size) if q != rank]
        self.order = self.peers  # summation order after the rank's own input: the others in rank order
        self.control: Segment | None = None
        self.words: Any = None
        self.data: list[Segment] = []
        self.typed: dict[torch.dtype, list[torch.Tensor]] = {}
        self.pids: list[int] = []
        self.seq = 0
        self.broken: str | None = None
        self.buffers: list[list[Segment]] = []
        self.buffer_of: dict[int, int] = {}  # data_ptr of this rank's buffer -> its index

    def slots(self, dtype: torch.dtype) -> list[torch.Tensor]:
        views = self.typed.get(dtype)
        if views is None:
            views = self.typed[dtype] = [segment.data.view(dtype) for segment in self.data]
        return views


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
        self._groups: dict[Any, _Group] = {}

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
        state = self._state(group, None)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        index = len(state.buffers)
        mine = Segment.create(Segment.new_name(job_id(), state.rank, f"b{index}"), nbytes)
        try:
            infos = self._exchange(state, group, (mine.path, numel, str(dtype)), "shared_buffer")
            wanted = {(numel, str(dtype))}
            if {(info[1], info[2]) for info in infos} != wanted:
                asked = ", ".join(f"rank {q}: {info[1]} x {info[2]}" for q, info in enumerate(infos))
                raise ConfigError(f"shm: shared_buffer called with different sizes or dtypes ({asked})")
            segments = [
                mine if q == state.rank else self._attach(state, q, infos[q][0], nbytes)
                for q in range(state.size)
            ]
            self._exchange(state, group, True, "shared_buffer")
        finally:
            mine.unlink()
        state.buffers.append(segments)
        tensor = mine.data[:nbytes].view(dtype)
        state.buffer_of[mine.data.data_ptr()] = index
        return tensor

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
                f"{self.name} {op}: the shared-memory reducer works on CPU tensors, got one on {tensor.device}; "
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
        self, state: _Group, flat: torch.Tensor, bounds: list[tuple[int, int]], timeout: float, op: str
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
            self._wait(state, REDUCED, seq, "publish its reduced chunk", op, timeout)
            for c, (a, b) in enumerate(ranges(k)):
                if c != rank and b > a:
                    flat[a:b].copy_(block(c, seq, c, b - a))
            words[DONE * size + rank] = seq

        for k in range(pieces):
            seq = first + k
            piece = ranges(k)
            if k == 0:
                self._begin(state, first, -1, 0, flat, op, timeout)
            else:
                self._wait(state, DONE, seq - SLOTS, "free its staging slot", op, timeout)
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
                self._wait(state, ARRIVED, seq, "copy in its data", op, timeout)
                if k == 0:
                    self._check_calls(state, first, op)
                if b > a:
                    mine = flat[a:b]
                    if gather:
                        out = block(rank, seq, rank, b - a)
                        torch.add(mine, block(state.order[0], seq, rank, b - a), out=out)
                        for q in state.order[1:]:
                            out.add_(block(q, seq, rank, b - a))
                        mine.copy_(out)
                    else:
                        for q in state.order:
                            mine.add_(block(q, seq, rank, b - a))
                words[REDUCED * size + rank] = seq
                if not gather:
                    words[DONE * size + rank] = seq
            elif k == 0:
                self._wait(state, ARRIVED, first, "publish its shard", op, timeout)
                self._check_calls(state, first, op)
        if gather:
            finish(pieces - 1)

    def _in_place(
        self, state: _Group, flat: torch.Tensor, index: int, bounds: list[tuple[int, int]], timeout: float
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
        self._begin(state, first, index, offset, flat, "allreduce", timeout)
        words[ARRIVED * size + rank] = last
        self._wait(state, ARRIVED, last, "have its buffer ready", "allreduce", timeout)
        self._check_calls(state, first, "allreduce")

        def finish(k: int) -> None:
            self._wait(state, REDUCED, first + k, "publish its reduced chunk", "allreduce", timeout)
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
                for q in state.order:
                    mine.add_(views[q][a:b])
            words[REDUCED * size + rank] = first + k
            if k > 0:
                finish(k - 1)
        finish(pieces - 1)
        words[DONE * size + rank] = last
        self._wait(state, DONE, last, "finish reading this rank's buffer", "allreduce", timeout)

    # ---- flags ----------------------------------------------------------------------------------------

    def _begin(
        self, state: _Group, first: int, index: int, offset: int, flat: torch.Tensor, op: str, timeout: float
    ) -> None:
        """Describe this call (first sequence number ``first``) in the control rows of its slot, after every
        peer is DONE with ``first - SLOTS``: the last call described there, which it has compared by then."""
        self._wait(state, DONE, first - SLOTS, "free its staging slot", op, timeout)
        words, size, rank = state.words, state.size, state.rank
        base = (4 + CALL_FIELDS * (first % SLOTS)) * size + rank
        words[base + size] = index
        words[base + 2 * size] = offset
        words[base + 3 * size] = flat.numel()
        words[base + 4 * size] = _dtype_code(flat.dtype)
        words[base] = first

    def _check_calls(self, state: _Group, first: int, op: str) -> None:
        """Once every peer has ARRIVED at ``first``: its description of the call must equal this rank's."""
        words, size, rank = state.words, state.size, state.rank
        base = (4 + CALL_FIELDS * (first % SLOTS)) * size
        mine = [words[base + field * size + rank] for field in range(CALL_FIELDS)]
        for q in state.peers:
            theirs = [words[base + field * size + q] for field in range(CALL_FIELDS)]
            if theirs != mine:

                def say(d: list[int]) -> str:
                    where = "a private tensor" if d[1] < 0 else f"shared buffer {d[1]} at byte {d[2]}"
                    dtype = _DTYPES[d[4]] if d[4] < len(_DTYPES) else "another dtype"
                    return f"{d[3]} elements of {dtype} in {where} (call {d[0]})"

                raise CommError(
                    f"{self.name} {op}: rank {rank} and rank {q} made different calls (rank {rank}: "
                    f"{say(mine)}; rank {q}: {say(theirs)}); every rank must make the same calls in the same "
                    "order, on tensors of the same length and dtype"
                )

    def _wait(self, state: _Group, row: int, seq: int, what: str, op: str, timeout: float) -> None:
        """Return once every peer's flag ``row`` is >= ``seq`` (see the module docstring)."""
        words, base = state.words, row * state.size
        for q in state.peers:
            if words[base + q] < seq:
                break
        else:
            return
        spins = 0
        started = time.monotonic()
        checked = started
        while True:
            lagging = [q for q in state.peers if words[base + q] < seq]
            if not lagging:
                return
            spins += 1
            if spins < 300:
                continue
            if spins < 3000:
                os.sched_yield()
            else:
                time.sleep(min(1e-3, 2e-6 * (spins - 3000) + 2e-5))
            now = time.monotonic()
            if now - checked > 0.02:
                checked = now
                dead = [q for q in lagging if not pid_alive(state.pids[q])]
                if dead:
                    names = ", ".join(f"rank {q} (pid {state.pids[q]})" for q in dead)
                    raise CommError(
                        f"{self.name} {op}: rank {state.rank} waited for {names} to {what}, but it has "
                        "exited; a peer may have died (its own output says why)"
                    )
                if now - started > timeout:
                    names = ", ".join(f"rank {q}" for q in lagging)
                    raise CommError(
                        f"{self.name} {op}: rank {state.rank} timed out after {timeout:g} s waiting for "
                        f"{names} to {what}; a peer may have died or stopped calling {op} (every rank "
                        "must make the same calls in the same order)"
                    )

    # ---- setup ----------------------------------------------------------------------------------------

    def _state(self, group: Any, timeout_s: float | None) -> _Group:
        key = dist.group.WORLD if group is None else group
        state = self._groups.get(key)
        if state is None:
            state = self._setup(group)
            self._groups[key] = state
        return state

    def _setup(self, group: Any) -> _Group:
        if platform.machine().lower() not in _X86:
            raise ConfigError(
                f"shm: the shared-memory reducer relies on x86-64 store ordering and this machine is "
                f"{platform.machine()}; use --reducer ring (or backend)"
            )
        state = _Group(dist.get_rank(group), dist.get_world_size(group))
        if state.size == 1:
            return state
        remove_stale()
        job, rank = job_id(), state.rank
        created: list[Segment] = []
        try:
            data = Segment.create(Segment.new_name(job, rank, "data"), SLOTS * state.size * self.piece_bytes)
            created.append(data)
            if rank == 0:
                created.append(Segment.create(Segment.new_name(job, rank, "control"), 8 * ROWS * state.size))
        except OSError as error:
            for segment in created:
                segment.unlink()
            raise ConfigError(
                f"shm: rank {rank} could not create a shared segment in {directory()} ({error}); the shm "
                "reducer needs a writable /dev/shm with room (docker: --shm-size), or use --reducer ring"
            ) from error
        try:
            mine = (data.path, created[1].path if rank == 0 else None, os.getpid(), platform.node())
            infos = self._exchange(state, group, mine, "setup")
            missing = ""
            try:
                state.data = [
                    data if q == rank else self._attach(state, q, infos[q][0], data.nbytes)
                    for q in range(state.size)
                ]
                state.control = (
                    created[1] if rank == 0 else self._attach(state, 0, infos[0][1], 8 * ROWS * state.size)
                )
            except ConfigError as error:
                missing = str(error)
            problems = self._exchange(state, group, missing, "setup")
        finally:
            for segment in created:
                segment.unlink()
        for problem in problems:
            if problem:
                raise ConfigError(problem)
        assert state.control is not None
        state.words = state.control.words
        state.pids = [info[2] for info in infos]
        state.words[PIDS * state.size + rank] = os.getpid()
        return state

    def _attach(self, state: _Group, q: int, path: str, nbytes: int) -> Segment:
        try:
            return Segment.attach(path, nbytes)
        except OSError as error:
            raise ConfigError(
                f"shm: rank {state.rank} cannot see rank {q}'s shared segment {path} ({error}): the shm "
                "reducer needs every rank of the group on one host, sharing one /dev/shm; across hosts use "
                "--reducer hierarchical"
            ) from error

    def _exchange(self, state: _Group, group: Any, value: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * state.size
        try:
            dist.all_gather_object(out, value, group=group)
        except Exception as error:
            raise CommError(
                f"{self.name} allreduce: rank {state.rank} could not exchange the shared segments' names "
                f"({what}: {type(error).__name__}: {_backend_message(error)}); a peer may have died"
            ) from error
        return out
