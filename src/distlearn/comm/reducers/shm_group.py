"""The shared state of the shm reducer's ranks in one process group: segments, flags and waits.

See :mod:`distlearn.comm.reducers.shm` for the algorithm and :mod:`distlearn.comm.shm_segments` for the
segments' names and cleanup. :meth:`ShmGroup.open` is the setup (the only c10d traffic: two
``all_gather_object`` per group and two per shared buffer); afterwards ranks synchronise only through the
control segment's int64 words: ``ROWS`` rows of R words, word ``row * R + rank`` written only by ``rank``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from distlearn.comm.reducers.base import _backend_message
from distlearn.comm.shm_segments import Segment, directory, job_id, pid_alive, remove_stale
from distlearn.errors import CommError, ConfigError

__all__ = ["ARRIVED", "DONE", "REDUCED", "SLOTS", "ShmGroup"]

SLOTS = 3
"""Staging slots per rank: a rank may run up to ``SLOTS - 1`` pieces ahead of its slowest peer."""

ARRIVED, REDUCED, DONE, PIDS, SLEEPING = range(5)
HEAD = 5
CALL_FIELDS = 5  # first sequence number, shared buffer index (-1: none), byte offset, numel, dtype code
ROWS = HEAD + CALL_FIELDS * SLOTS
"""A call is described in the rows of the slot of its first sequence number, so a description is not
overwritten before every peer has compared it (see :meth:`ShmGroup.begin`)."""

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
_DTYPES += [torch.int16, torch.int8, torch.uint8]
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
SPINS = 400
"""Flag reads before a waiting rank gives its core away (a read is about 0.1 us)."""
YIELDS = 0
"""Then this many ``os.sched_yield`` (none: on the loaded machine one cost 170 us), then a futex sleep."""
SLEEP_S = 2e-3


class _Futex:
    """FUTEX_WAIT / FUTEX_WAKE (Linux x86-64) on a word of a shared mapping; None where unavailable."""

    def __init__(self) -> None:
        self.syscall = ctypes.CDLL(None, use_errno=True).syscall
        self.syscall.restype = ctypes.c_long
        self.timeout = ctypes.c_long * 2

    def wait(self, address: int, expected: int, seconds: float) -> None:
        timeout = self.timeout(int(seconds), int((seconds % 1) * 1e9))
        # FUTEX_WAIT (0): sleep while the low 32 bits at ``address`` equal ``expected``
        self.syscall(
            _SYS_FUTEX, ctypes.c_void_p(address), 0, ctypes.c_uint32(expected), ctypes.byref(timeout), None, 0
        )

    def wake(self, address: int) -> None:
        self.syscall(_SYS_FUTEX, ctypes.c_void_p(address), 1, 0x7FFFFFFF, None, None, 0)  # FUTEX_WAKE (1)


_SYS_FUTEX = 202
try:
    _FUTEX: _Futex | None = _Futex() if sys.platform == "linux" and platform.machine() == "x86_64" else None
except (OSError, AttributeError):
    _FUTEX = None


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 100


class ShmGroup:
    """This rank's mapped segments and counters for one process group (made by :meth:`open`).

    ``data[q]`` is rank q's staging segment, ``words`` the control segment's int64 words, ``seq`` the last
    sequence number used (the same on every rank: each piece of each call takes the next one).
    """

    def __init__(self, rank: int, size: int, name: str) -> None:
        self.rank = rank
        self.size = size
        self.name = name
        self.peers = [q for q in range(size) if q != rank]
        self.control: Segment | None = None
        self.words: Any = None
        self.address = 0  # of the control segment in this process
        self.data: list[Segment] = []
        self.typed: dict[torch.dtype, list[torch.Tensor]] = {}
        self.views: dict[tuple[Any, ...], list[torch.Tensor]] = {}  # the small path's slot views, cached
        self.pids: list[int] = []
        self.seq = 0
        self.broken: str | None = None
        self.buffers: list[list[Segment]] = []
        self.buffer_of: dict[int, int] = {}  # data_ptr of this rank's shared buffer -> its index

    # ---- setup ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, group: Any, piece_bytes: int, name: str = "shm") -> ShmGroup:
        """Set up the segments of ``group`` (collective): create, exchange names, attach, barrier, unlink."""
        if platform.machine().lower() not in _X86:
            raise ConfigError(
                f"{name}: the shared-memory reducer relies on x86-64 store ordering and this machine is "
                f"{platform.machine()}; use --reducer ring (or backend)"
            )
        state = cls(dist.get_rank(group), dist.get_world_size(group), name)
        if state.size == 1:
            return state
        remove_stale()
        job, rank = job_id(), state.rank
        control_bytes = 8 * ROWS * state.size
        created: list[Segment] = []
        problem = ""
        try:
            created.append(
                Segment.create(Segment.new_name(job, rank, "data"), SLOTS * state.size * piece_bytes)
            )
            if rank == 0:
                created.append(Segment.create(Segment.new_name(job, rank, "control"), control_bytes))
        except OSError as error:
            problem = (
                f"{name}: rank {rank} could not create a shared segment in {directory()} ({error}); the shm "
                "reducer needs a writable /dev/shm with room (docker: --shm-size), or use --reducer ring"
            )
        try:
            # names, not paths: each rank looks in its own directory, as ranks on two hosts would
            names = [os.path.basename(segment.path) for segment in created]
            infos = state.exchange(group, (problem, names, os.getpid()), "setup")
            problems = [info[0] for info in infos if info[0]]
            if not problems:
                try:
                    state.data = [
                        created[0]
                        if q == rank
                        else state.attach(q, infos[q][1][0], SLOTS * state.size * piece_bytes)
                        for q in range(state.size)
                    ]
                    state.control = (
                        created[1] if rank == 0 else state.attach(0, infos[0][1][1], control_bytes)
                    )
                except ConfigError as error:
                    problem = str(error)
                problems = [p for p in state.exchange(group, problem, "setup") if p]
        finally:
            for segment in created:
                segment.unlink()
        if problems:
            raise ConfigError(problem or problems[0])
        assert state.control is not None
        state.words = state.control.words
        state.address = ctypes.addressof(ctypes.c_char.from_buffer(state.control.memory))
        state.pids = [info[2] for info in infos]
        state.words[PIDS * state.size + rank] = os.getpid()
        return state

    def new_buffer(self, group: Any, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed shared tensor of ``numel`` elements mapped by every rank (collective, see
        :meth:`distlearn.comm.reducers.ShmReducer.shared_buffer`). A rank's failure (no room, a segment it
        cannot see, different arguments) is a ConfigError on every rank, not a hang of the others."""
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        index = len(self.buffers)
        problem, mine = "", None
        try:
            mine = Segment.create(Segment.new_name(job_id(), self.rank, f"b{index}"), nbytes)
        except OSError as error:
            problem = (
                f"{self.name}: rank {self.rank} could not create a shared buffer of {nbytes} bytes in "
                f"{directory()} ({error}); make room in /dev/shm (docker: --shm-size) or use smaller buckets"
            )
        try:
            name = os.path.basename(mine.path) if mine is not None else ""
            infos = self.exchange(group, (name, numel, str(dtype), problem), "shared_buffer")
            problems = [info[3] for info in infos if info[3]]
            if not problems and {(info[1], info[2]) for info in infos} != {(numel, str(dtype))}:
                asked = ", ".join(f"rank {q}: {info[1]} x {info[2]}" for q, info in enumerate(infos))
                problems.append(
                    f"{self.name}: shared_buffer called with different sizes or dtypes ({asked}); every rank "
                    "must ask for the same buffers in the same order"
                )
            if not problems:
                try:
                    segments = [
                        mine if q == self.rank else self.attach(q, infos[q][0], nbytes)
                        for q in range(self.size)
                    ]
                except ConfigError as error:
                    problem = str(error)
                problems = [p for p in self.exchange(group, problem, "shared_buffer") if p]
        finally:
            if mine is not None:
                mine.unlink()
        if problems:
            raise ConfigError(problem or problems[0])
        assert mine is not None
        self.buffers.append(segments)
        self.buffer_of[mine.data.data_ptr()] = index
        return mine.data[:nbytes].view(dtype)

    def attach(self, q: int, name: str, nbytes: int) -> Segment:
        """Map rank ``q``'s segment ``name`` (in this rank's segment directory); ConfigError if not there."""
        path = str(directory() / name)
        try:
            return Segment.attach(path, nbytes)
        except OSError as error:
            raise ConfigError(
                f"{self.name}: rank {self.rank} cannot see rank {q}'s shared segment {path} ({error}): the "
                "shm reducer needs every rank of the group on one host, sharing one /dev/shm; across hosts "
                "use --reducer hierarchical"
            ) from error

    def exchange(self, group: Any, value: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, value, group=group)
        except Exception as error:
            raise CommError(
                f"{self.name} allreduce: rank {self.rank} could not exchange the shared segments' names "
                f"({what}: {type(error).__name__}: {_backend_message(error)}); a peer may have died"
            ) from error
        return out

    def slots(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every rank's staging segment as ``dtype`` elements."""
        views = self.typed.get(dtype)
        if views is None:
            views = self.typed[dtype] = [segment.data.view(dtype) for segment in self.data]
        return views

    # ---- flags ----------------------------------------------------------------------------------------

    def set(self, row: int, seq: int) -> None:
        """Publish this rank's flag ``row`` = ``seq``, and wake the peers sleeping in the kernel, if any."""
        index = row * self.size + self.rank
        self.words[index] = seq
        if _FUTEX is not None:
            words, base = self.words, SLEEPING * self.size
            for q in self.peers:
                if words[base + q]:
                    _FUTEX.wake(self.address + 8 * index)
                    return

    def begin(self, first: int, index: int, offset: int, flat: torch.Tensor, op: str, timeout: float) -> None:
        """Describe this call (first sequence number ``first``) in the control rows of its slot, after every
        peer is DONE with ``first - SLOTS``: the last call described there, which it has compared by then."""
        self.wait(DONE, first - SLOTS, "free its staging slot", op, timeout)
        words, size = self.words, self.size
        base = (HEAD + CALL_FIELDS * (first % SLOTS)) * size + self.rank
        words[base + size] = index
        words[base + 2 * size] = offset
        words[base + 3 * size] = flat.numel()
        words[base + 4 * size] = _dtype_code(flat.dtype)
        words[base] = first

    def check_calls(self, first: int, op: str) -> None:
        """Once every peer has ARRIVED at ``first``: its description of the call must equal this rank's."""
        words, size, rank = self.words, self.size, self.rank
        base = (HEAD + CALL_FIELDS * (first % SLOTS)) * size
        mine = [words[base + field * size + rank] for field in range(CALL_FIELDS)]
        for q in self.peers:
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

    def wait(self, row: int, seq: int, what: str, op: str, timeout: float) -> None:
        """Return once every peer's flag ``row`` is >= ``seq``: spin, yield, then sleep, checking the
        deadline and the lagging peers' pids every 20 ms; CommError naming the ranks otherwise."""
        words, base = self.words, row * self.size
        for q in self.peers:
            if words[base + q] < seq:
                break
        else:
            return
        spins = 0
        started = time.monotonic()
        checked = started
        while True:
            lagging = [q for q in self.peers if words[base + q] < seq]
            if not lagging:
                return
            spins += 1
            if spins < SPINS:
                continue
            if spins < SPINS + YIELDS:
                os.sched_yield()
            elif _FUTEX is None:
                time.sleep(min(1e-3, 1e-5 * (spins - SPINS - YIELDS) + 2e-5))
            else:  # sleep until the first lagging peer's flag changes (it wakes us), 2 ms at most
                index = base + lagging[0]
                value = words[index]
                words[SLEEPING * self.size + self.rank] = 1
                if value < seq:
                    _FUTEX.wait(self.address + 8 * index, value & 0xFFFFFFFF, SLEEP_S)
                words[SLEEPING * self.size + self.rank] = 0
            now = time.monotonic()
            if now - checked > 0.02:
                checked = now
                dead = [q for q in lagging if not pid_alive(self.pids[q])]
                if dead:
                    names = ", ".join(f"rank {q} (pid {self.pids[q]})" for q in dead)
                    raise CommError(
                        f"{self.name} {op}: rank {self.rank} waited for {names} to {what}, but it has "
                        "exited; a peer may have died (its own output says why)"
                    )
                if now - started > timeout:
                    names = ", ".join(f"rank {q}" for q in lagging)
                    raise CommError(
                        f"{self.name} {op}: rank {self.rank} timed out after {timeout:g} s waiting for "
                        f"{names} to {what}; a peer may have died or stopped calling {op} (every rank "
                        "must make the same calls in the same order)"
                    )
