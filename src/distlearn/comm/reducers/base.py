"""The reducer contract (:class:`Reducer`), its point-to-point :class:`Channel`, and the backend's allreduce.

A :class:`Reducer` sums a tensor in place across a process group; subclasses implement
:meth:`Reducer._reduce` on a flat contiguous tensor with a :class:`Channel`, which posts c10d point-to-point
operations, counts the bytes sent and waits with a deadline (see the package docstring,
:mod:`distlearn.comm.reducers`). :class:`BackendReducer` is ``dist.all_reduce``, the reference.

Batched rounds (NCCL): with ``batched`` a reducer runs as a list of *rounds*, each a list of
:class:`Message` (sends and receives) that :meth:`Channel.run_rounds` posts as one
``torch.distributed.batch_isend_irecv`` and waits for, with the deadline, before the next round; nothing is
posted ahead for a later round. See the package docstring ("On NCCL").
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distlearn.comm.groups import twin_group, warm_group
from distlearn.comm.reducers.worker import run_jobs, worker_context
from distlearn.comm.traffic import ring_allreduce_bytes
from distlearn.errors import CommError, ConfigError

__all__ = [
    "DEFAULT_TAG",
    "DEFAULT_TIMEOUT_S",
    "BackendReducer",
    "Channel",
    "Message",
    "Reducer",
    "Rounds",
    "chunk_bounds",
]

DEFAULT_TIMEOUT_S = 60.0
"""Deadline of each point-to-point operation unless the reducer or the call says otherwise."""

BATCHED_ENV = "DISTLEARN_BATCHED_P2P"
"""Set to 1: reducers built with ``batched=None`` run batched rounds on any backend (for tests on gloo)."""

DEFAULT_TAG = 0x4452
"""c10d message tag of the reducers' point-to-point traffic (any value, the same on every rank)."""


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``parts`` consecutive chunks of ``n`` elements whose sizes differ by at most 1.

    The first ``n % parts`` chunks get one extra element (the sizes of ``torch.tensor_split``).
    """
    base, extra = divmod(n, parts)
    bounds = []
    start = 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class _Op:
    """One posted point-to-point operation, with what the error message needs to say about it."""

    __slots__ = ("work", "peer", "sending", "what")

    def __init__(self, work: Any, peer: int, sending: bool, what: str) -> None:
        self.work = work
        self.peer = peer
        self.sending = sending
        self.what = what


class Message:
    """One send or receive of a batched round: ``tensor`` to or from ``peer`` (a rank of the group);
    ``then`` runs after the round completed (a receive's sum into the tensor)."""

    __slots__ = ("sending", "tensor", "peer", "what", "then")

    def __init__(
        self, sending: bool, tensor: torch.Tensor, peer: int, what: str, then: Callable[[], Any] | None = None
    ) -> None:
        self.sending = sending
        self.tensor = tensor
        self.peer = peer
        self.what = what
        self.then = then


Rounds = dict[int, list[Message]]
"""Round index -> its messages; rounds run in index order, and a message and its match at the peer carry the
same index (so no rank waits in round t for a message its peer posts in a later round)."""


class Channel:
    """Point-to-point on ``group`` for one allreduce call: post, count bytes, wait with a deadline.

    ``batched``: every message goes over ``group`` (no duplex twin) in rounds, :meth:`run_rounds`.
    """

    def __init__(self, reducer: Reducer, group: Any, timeout_s: float, *, batched: bool = False) -> None:
        self.reducer = reducer
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout_s = timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        self.batched = batched
        # messages to higher ranks travel on ``group``, to lower ranks on its twin (see distlearn.comm.groups)
        self.downward = reducer._twin(group, timeout_s) if self.size > 1 and not batched else group

    def run_rounds(self, rounds: Rounds) -> None:
        """Run ``rounds`` in index order: each round's non-empty messages posted together (one
        ``batch_isend_irecv``), waited with the deadline, then each message's ``then``."""
        for index in sorted(rounds):
            messages = [m for m in rounds[index] if m.tensor.numel()]
            if messages:
                self.exchange(messages)
            for message in rounds[index]:
                if message.then is not None:
                    message.then()

    def exchange(self, messages: list[Message]) -> None:
        """Post ``messages`` as one batch (``batch_isend_irecv``; without ``batched``: one isend/irecv
        each) and wait for all of them with the deadline. Sends count towards ``bytes_sent``."""
        if not self.batched:
            posted: list[_Op | None] = [
                (self.isend if m.sending else self.irecv)(m.tensor, m.peer, m.what) for m in messages
            ]
            self.wait_all(posted)
            return
        tag = self.reducer.tag
        p2p = [
            dist.P2POp(
                dist.isend if m.sending else dist.irecv,
                m.tensor,
                group=self.group,
                tag=tag,
                group_peer=m.peer,
            )
            for m in messages
        ]
        try:
            works = dist.batch_isend_irecv(p2p)
        except Exception as error:  # a broken connection can fail at posting time already
            first = messages[0]
            raise self._error(_Op(None, first.peer, first.sending, first.what), error) from error
        sent = [m.tensor for m in messages if m.sending]
        self.reducer.bytes_sent += sum(t.numel() * t.element_size() for t in sent)
        if len(works) == len(messages):  # one work per message (gloo; NCCL without coalescing)
            ops = [_Op(w, m.peer, m.sending, m.what) for w, m in zip(works, messages, strict=True)]
        else:  # NCCL coalesces a batch into one work: name the whole round in an error
            first = messages[0]
            what = f"{first.what} (one of a batch of {len(messages)} messages)"
            ops = [_Op(w, first.peer, first.sending, what) for w in works]
        self.wait_all(ops)

    def isend(self, tensor: torch.Tensor, peer: int, what: str) -> _Op:
        try:
            group = self.group if peer > self.rank else self.downward
            work = dist.isend(tensor, group=group, tag=self.reducer.tag, group_dst=peer)
        except Exception as error:  # a broken connection can fail at posting time already
            raise self._error(_Op(None, peer, True, what), error) from error
        self.reducer.bytes_sent += tensor.numel() * tensor.element_size()
        return _Op(work, peer, True, what)

    def irecv(self, tensor: torch.Tensor, peer: int, what: str) -> _Op:
        try:
            group = self.group if peer < self.rank else self.downward
            work = dist.irecv(tensor, group=group, tag=self.reducer.tag, group_src=peer)
        except Exception as error:
            raise self._error(_Op(None, peer, False, what), error) from error
        return _Op(work, peer, False, what)

    def isend_nonempty(self, tensor: torch.Tensor, peer: int, what: str) -> _Op | None:
        return self.isend(tensor, peer, what) if tensor.numel() else None

    def irecv_nonempty(self, tensor: torch.Tensor, peer: int, what: str) -> _Op | None:
        return self.irecv(tensor, peer, what) if tensor.numel() else None

    def wait_all(self, ops: list[_Op | None]) -> None:
        for op in ops:
            if op is not None:
                self.wait(op)

    def wait(self, op: _Op) -> None:
        try:
            completed = op.work.wait(self.timeout)
        except Exception as error:  # gloo raises RuntimeError subclasses for timeouts and closed peers
            raise self._error(op, error) from error
        if completed is False:
            raise self._error(op, None)

    def _error(self, op: _Op, error: BaseException | None) -> CommError:
        if op.peer < 0:  # a collective of the backend: no single peer
            action = f"waiting for {op.what}"
        elif op.sending:
            action = f"sending {op.what} to rank {op.peer}"
        else:
            action = f"receiving {op.what} from rank {op.peer}"
        prefix = f"{self.reducer.name} allreduce: rank {self.rank}"
        text = "" if error is None else _backend_message(error)
        if error is None or "timed out" in text.lower() or "timeout" in text.lower():
            return CommError(
                f"{prefix} timed out after {self.timeout_s:g} s {action}; a peer may have died or stopped "
                "calling allreduce (every rank must make the same calls in the same order)"
            )
        return CommError(f"{prefix} failed {action} ({text}); a peer may have died")


def _backend_message(error: BaseException) -> str:
    """The useful part of a backend error: gloo's first line without its source path and boilerplate."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if text.startswith("[") and "] " in text:  # "[/path/to/pair.cc:537] Read error ..."
        text = text.split("] ", 1)[1]
    return text.split(". This is typically", 1)[0]


class Reducer:
    """An allreduce algorithm: sums a tensor in place across a process group.

    Subclasses implement :meth:`_reduce` on a flat contiguous tensor; this base class validates input,
    keeps the byte counter and runs asynchronous calls in order on one worker thread.

    Args:
        timeout_s: deadline of each point-to-point operation (seconds); a call's ``timeout_s`` overrides it.
        tag: c10d tag of this reducer's messages, the same on every rank.
        duplex: send to lower ranks over a second process group with the same ranks (created on the
            group's first call and shared by every reducer), so that two ranks exchanging data do not
            take turns on gloo's per-connection lock. Ignored by ``backend`` and in batched rounds.
        batched: run each exchange round as one ``batch_isend_irecv`` on ``group`` (what NCCL needs);
            None (the default): batched exactly when the tensor is on a CUDA device and the group's
            backend is NCCL (or when ``DISTLEARN_BATCHED_P2P=1``). True forces it on any backend (gloo
            too: how the CPU tests run it).

    Attributes:
        name: the algorithm's name in :data:`REDUCERS`.
        bytes_sent: payload bytes this rank has sent since the reducer was created (counted at each send).
    """

    name: ClassVar[str] = "reducer"
    point_to_point: ClassVar[bool] = True

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tag: int = DEFAULT_TAG,
        duplex: bool = True,
        batched: bool | None = None,
    ) -> None:
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ConfigError(
                f"{self.name}: timeout_s must be a positive number of seconds, got {timeout_s!r}"
            )
        if not isinstance(tag, int) or isinstance(tag, bool) or tag < 0:
            raise ConfigError(f"{self.name}: tag must be a non-negative integer, got {tag!r}")
        if not isinstance(duplex, bool):
            raise ConfigError(f"{self.name}: duplex must be true or false, got {duplex!r}")
        if batched is not None and not isinstance(batched, bool):
            raise ConfigError(
                f"{self.name}: batched must be true, false or None (automatic: NCCL), got {batched!r}"
            )
        self.timeout_s = float(timeout_s)
        self.tag = tag
        self.duplex = duplex
        self.batched = batched
        self._streams: dict[torch.device, Any] = {}  # the worker thread's CUDA stream per device
        self.bytes_sent = 0
        self._workspace: dict[torch.dtype, torch.Tensor] = {}
        self._jobs: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timeout_s={self.timeout_s:g})"

    # ---- public API -------------------------------------------------------------------------------------

    def allreduce_(
        self, tensor: torch.Tensor, group: Any = None, *, timeout_s: float | None = None
    ) -> torch.Tensor:
        """Replace ``tensor`` by the sum of every rank's ``tensor`` (in place) and return it.

        Waits for this reducer's outstanding :meth:`allreduce_async` calls first (they were issued earlier).
        Raises :class:`CommError` on a timeout or a dead peer.
        """
        _check_tensor(tensor, self.name)
        with self._lock:
            pending = self._pending
        if pending:
            return self.allreduce_async(tensor, group, timeout_s=timeout_s).wait()
        return self._run(tensor, group, timeout_s)

    def allreduce_async(
        self, tensor: torch.Tensor, group: Any = None, *, timeout_s: float | None = None
    ) -> torch.futures.Future:
        """Start the in-place sum of ``tensor`` and return a future that completes with ``tensor``.

        Calls run one after another on this reducer's worker thread, in the order they were made; a
        failure sets the future's exception (a :class:`CommError`), which ``future.wait()`` raises.
        Do not touch ``tensor`` until the future is done.
        """
        _check_tensor(tensor, self.name)
        # collective steps (the duplex twin group, a batched group's warm-up) here, in the caller's thread
        self._prepare(tensor, group, timeout_s)
        on_device = worker_context(tensor, self._streams)
        # a CUDA-aware future: its result is recorded on the worker's stream; wait() orders the caller's after
        devices = [tensor.device] if tensor.is_cuda else None
        future: torch.futures.Future = torch.futures.Future(devices=devices)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=run_jobs, args=(self._jobs,), name=f"distlearn-{self.name}-reducer", daemon=True
                )
                self._thread.start()
            self._pending += 1
        assert self._jobs is not None
        self._jobs.put((lambda: self._run(tensor, group, timeout_s), future, self._done, on_device))
        return future

    def close(self) -> None:
        """Stop the worker thread (after the calls already queued). The reducer stays usable."""
        with self._lock:
            thread, jobs = self._thread, self._jobs
            self._thread = None
        if thread is not None and jobs is not None:
            jobs.put(None)
            thread.join()

    # ---- for subclasses ---------------------------------------------------------------------------------

    def _reduce(self, flat: torch.Tensor, channel: Channel) -> None:
        raise NotImplementedError

    def _rounds(self, flat: torch.Tensor, channel: Channel) -> Rounds:
        """The algorithm as batched rounds (see :class:`Message`), run by :meth:`Channel.run_rounds`."""
        raise NotImplementedError(f"{self.name} has no batched form")

    def _buffer(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        """A reusable receive buffer of ``numel`` elements (kept, so big calls do not fault pages again)."""
        buffer = self._workspace.get(dtype)
        if buffer is None or buffer.numel() < numel or buffer.device != device:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[dtype] = buffer
        return buffer[:numel]

    # ---- internals --------------------------------------------------------------------------------------

    def _batched_for(self, tensor: torch.Tensor, group: Any) -> bool:
        """Whether a call on ``tensor`` runs in batched rounds (see ``batched``; the environment variable
        ``DISTLEARN_BATCHED_P2P=1`` makes None mean True, to run a whole job's reducers batched on gloo)."""
        if self.batched is not None:
            return self.batched
        if os.environ.get(BATCHED_ENV) == "1":
            return True
        return tensor.is_cuda and "nccl" in str(dist.get_backend(group)).lower()

    def _prepare(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> None:
        """The collective steps before a call: create the duplex twin group, or, for batched rounds, make
        sure the group has run one collective (NCCL's batched point-to-point is undefined as a group's first
        operation unless every rank takes part, and a round need not involve every rank)."""
        if not (self.point_to_point and dist.is_initialized()) or dist.get_world_size(group) < 2:
            return
        if self._batched_for(tensor, group):
            timeout_s = self.timeout_s if timeout_s is None else timeout_s
            try:
                warm_group(group, tensor.device, timeout_s)
            except Exception as error:
                raise CommError(
                    f"{self.name} allreduce: rank {dist.get_rank(group)} could not run the group's first "
                    f"collective within {timeout_s:g} s ({type(error).__name__}: {_backend_message(error)}); "
                    "a peer may have died or stopped calling allreduce"
                ) from error
        else:
            self._twin(group, timeout_s)

    def _twin(self, group: Any, timeout_s: float | None) -> Any:
        """The group for messages to lower ranks: the duplex twin of ``group``, or ``group`` itself."""
        if not (self.duplex and self.point_to_point) or not dist.is_initialized():
            return group
        if dist.get_world_size(group) < 2:
            return group
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            return twin_group(group, timeout_s)
        except Exception as error:  # rendezvous of the twin group: a peer that is gone or late
            raise CommError(
                f"{self.name} allreduce: rank {dist.get_rank(group)} could not create the second process "
                f"group for duplex exchanges ({type(error).__name__}: {_backend_message(error)}); a peer may "
                "have died, or pass duplex=False"
            ) from error

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _check_call(self, timeout_s: float | None, op: str = "allreduce") -> None:
        """Refuse a call with a non-positive ``timeout_s`` or without a process group."""
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"{self.name}: timeout_s must be positive, got {timeout_s!r}")
        if not dist.is_initialized():
            raise CommError(
                f"{self.name} {op}: no process group; call distlearn.launch.init_distributed() "
                "(or torch.distributed.init_process_group) first"
            )

    def _run(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> torch.Tensor:
        self._check_call(timeout_s)
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        batched = self.point_to_point and self._batched_for(work, group)
        if batched:
            self._prepare(work, group, timeout_s)  # once per group (cached); a no-op after allreduce_async's
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        channel = Channel(self, group, timeout, batched=batched)
        if channel.size > 1 and work.numel() > 0:
            if batched:
                channel.run_rounds(self._rounds(work.view(-1), channel))
            else:
                self._reduce(work.view(-1), channel)
        if work is not tensor:
            tensor.copy_(work)
        return tensor


def _check_tensor(tensor: Any, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{name} allreduce: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ConfigError(f"{name} allreduce: only dense tensors are supported, got layout {tensor.layout}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ConfigError(
            f"{name} allreduce: dtype {tensor.dtype} is not supported; use a floating or integer tensor"
        )


class BackendReducer(Reducer):
    """The process group's own ``dist.all_reduce`` (``ReduceOp.SUM``): the reference every algorithm is
    measured against. On gloo/CPU this is gloo's ring allreduce.

    ``bytes_sent`` counts the *nominal* ``2(p-1)/p n`` bytes of a ring (what gloo's ring sends); the
    backend does not report its own traffic.
    """

    name = "backend"
    point_to_point = False

    def allreduce_async(
        self, tensor: torch.Tensor, group: Any = None, *, timeout_s: float | None = None
    ) -> torch.futures.Future:
        """The backend's own asynchronous allreduce (its work queue keeps the order); future -> ``tensor``."""
        _check_tensor(tensor, self.name)
        with self._lock:
            pending = self._pending
        if pending or not tensor.is_contiguous():
            return super().allreduce_async(tensor, group, timeout_s=timeout_s)
        if not dist.is_initialized():
            raise CommError(
                "backend allreduce: no process group; call distlearn.launch.init_distributed() first"
            )
        self._count(tensor, group)
        work = dist.all_reduce(tensor, group=group, async_op=True)
        # ``value()`` re-raises the backend's error (a timeout, a dead peer); ignoring it would hand back
        # the un-reduced tensor as if the allreduce had succeeded.
        return work.get_future().then(lambda done: (done.value(), tensor)[1])

    def _reduce(self, flat: torch.Tensor, channel: Channel) -> None:
        self._count(flat, channel.group)
        work = dist.all_reduce(flat, group=channel.group, async_op=True)
        channel.wait(_Op(work, -1, False, "dist.all_reduce"))

    def _count(self, tensor: torch.Tensor, group: Any) -> None:
        size = dist.get_world_size(group)
        self.bytes_sent += ring_allreduce_bytes(tensor.numel(), tensor.element_size(), size)
