"""Allreduce algorithms built from c10d point-to-point, and the backend's own allreduce as the reference.

An allreduce leaves on every rank the elementwise sum of the ranks' tensors. The algorithms here are the
ones MPICH uses, as analysed by R. Thakur, R. Rabenseifner and W. Gropp, "Optimization of Collective
Communication Operations in MPICH", IJHPCA 19(1), 2005 (their cost model is :mod:`distlearn.comm.cost_model`;
``p`` ranks, ``n`` bytes, ``alpha`` latency per message, ``beta`` time per byte, ``gamma`` time per byte
reduced):

========================  ==========================================  =======================================
name                      steps                                       time
========================  ==========================================  =======================================
``backend``               ``dist.all_reduce`` (gloo's ring on CPU)    the reference
``ring``                  reduce-scatter, then all-gather (Patarasuk  2(p-1) alpha + 2(p-1)/p n beta
                          & Yuan 2009; Baidu's "ring allreduce")      + (p-1)/p n gamma
``tree``                  binomial-tree reduce to rank 0, then        2 log2(p) (alpha + n beta)
                          binomial-tree broadcast                     + log2(p) n gamma
``rabenseifner``          recursive-halving reduce-scatter, then      2 log2(p) alpha + 2(p-1)/p n beta
                          recursive-doubling all-gather (Rabenseifner + (p-1)/p n gamma
                          2004; Thakur et al. 2005, section 4.4)
``segmented-ring``        the ring, each chunk cut into segments of   2(p-1 + s - 1) alpha_seg + ...
                          ``segment_bytes`` and pipelined             (see cost_model)
========================  ==========================================  =======================================

Every reducer sums **in place** (the caller divides by the world size R to average), works for any world
size (1, 2, 3, ..., not only powers of two) and any tensor length (0, 1, fewer elements than ranks, not
divisible by R), for every floating dtype (and integer ones), and counts the payload bytes this rank
actually sent in :attr:`Reducer.bytes_sent`.

Where we differ from the papers:

* The ring's chunks are ``torch.tensor_split`` sizes (the first ``n mod p`` chunks one element longer),
  so chunk sizes differ by at most one and ``n < p`` leaves some chunks empty; empty messages are skipped
  on both sides (both compute the same sizes).
* The ring keeps its pipeline across the two phases: the last reduce-scatter step hands each reduced
  piece straight to the first all-gather step, and every step posts its receive before it waits (c10d
  ``irecv``/``isend``), so a rank sends and receives at the same time. For R = 2 it is a single exchange
  of halves, a sum, and a second exchange, received directly into the caller's tensor (no copy).
* Full duplex (``duplex=True``, the default): gloo serialises the send and the receive of one connection
  under one lock, so two ranks exchanging on one group take turns. Messages to lower ranks therefore go
  over a second process group with the same ranks (its own sockets and I/O thread), created collectively
  on the group's first allreduce and shared by every reducer; with R = 2 this took the ring from about
  0.85x to 1.1-1.3x gloo's allreduce at 1-64 MB. ``duplex=False`` keeps everything on ``group``.
* Rabenseifner's non-power-of-two case uses the simple pre/post step of Thakur et al. (2005, section 4.4):
  with ``p' = 2**floor(log2 p)`` and ``r = p - p'``, the first ``2r`` ranks pair up, each even one sends
  its whole vector to its odd neighbour (which adds it) and sits out, and gets the result back at the end.
  (Rabenseifner & Träff 2004 exchange halves instead, saving ``n beta``; not done here.)
* The tree is pipelined over segments (``segment_bytes``, 4 MiB by default), as NCCL's tree is and the
  MPICH tree is not: unsegmented it has ``2 log2 p`` full-vector messages on the critical path, which
  made it 0.87x gloo's allreduce at 64 MB with R = 2; ``segment_bytes=None`` restores the textbook tree.

Timeouts and failures: every point-to-point operation is waited with a deadline (``timeout_s``, per
reducer or per call). On a timeout or a dead peer (gloo reports "connection closed") a
:class:`distlearn.errors.CommError` names the algorithm, this rank, the peer and the operation, e.g.
``ring allreduce: rank 1 timed out after 10 s receiving chunk 0 (reduce-scatter step 1) from rank 0; a
peer may have died``. After such an error the process group is in an undefined state: destroy it.

Asynchrony: :meth:`Reducer.allreduce_async` returns a ``torch.futures.Future`` completed by one dedicated
worker thread per reducer instance, so several outstanding calls run in the order they were issued, the
same order on every rank. Use one reducer from one calling thread (plus its worker), and the same
sequence of calls on every rank of the group.

Tuning: ``segment_bytes`` of the segmented ring (default 4 MiB; 1 MiB segments measured 0.91-0.99x gloo at
16-64 MB with R = 2, 4 MiB ones 1.14-1.16x: a message costs much on loopback) trades per-message latency
against overlap of transfer and summation; tensors smaller than one segment behave exactly like the ring. For
small tensors (a few KB) the latency terms dominate: ``tree`` and ``rabenseifner`` have ``log2 p`` of them
instead of ``2(p - 1)``, and with R = 2 the tree's two one-way messages beat every exchange. ``tag`` separates
the reducer's messages from other point-to-point traffic on the same group; it must be the same on every rank.

Libraries: ``torch.distributed`` (c10d) ``isend``/``irecv``/``all_reduce`` on whatever backend the group
uses (gloo on CPU).
"""

from __future__ import annotations

import functools
import inspect
import queue
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distlearn.errors import CommError, ConfigError

__all__ = [
    "DEFAULT_TAG",
    "DEFAULT_TIMEOUT_S",
    "BackendReducer",
    "RabenseifnerReducer",
    "REDUCERS",
    "Reducer",
    "RingReducer",
    "SegmentedRingReducer",
    "TreeReducer",
    "chunk_bounds",
    "create_reducer",
]

DEFAULT_TIMEOUT_S = 60.0
"""Deadline of each point-to-point operation unless the reducer or the call says otherwise."""

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


_TWINS: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
_TWINS_LOCK = threading.Lock()


def _reverse_group(group: Any, timeout_s: float) -> Any:
    """A second process group with the ranks of ``group``, created once (collectively) and cached.

    gloo serialises the send and the receive of one connection under one lock, so an exchange between two
    ranks on one group is half duplex. Sending downward (to lower ranks) on a twin group, with its own
    sockets and I/O thread, makes it full duplex. Created on the group's first duplex allreduce, which every
    member makes at the same point of its program.
    """
    world = dist.group.WORLD
    key = (id(group), id(world))
    with _TWINS_LOCK:
        entry = _TWINS.get(key)
        if entry is None:
            ranks = dist.get_process_group_ranks(world if group is None else group)
            twin = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), use_local_synchronization=True)
            entry = _TWINS[key] = (group, world, twin)  # holding group and world keeps their ids unique
    return entry[2]


def release_twin_groups() -> None:
    """Forget the cached duplex twin groups (and the groups they were keyed on).

    Called by :func:`distlearn.launch.shutdown` before the process groups are destroyed: a group still
    referenced from here at interpreter exit would be torn down during finalization, where gloo's threads
    can abort the process ("terminate called without an active exception").
    """
    with _TWINS_LOCK:
        _TWINS.clear()


class _Channel:
    """Point-to-point on ``group`` for one allreduce call: post, count bytes, wait with a deadline."""

    def __init__(self, reducer: Reducer, group: Any, timeout_s: float) -> None:
        self.reducer = reducer
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout_s = timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        # messages to higher ranks travel on ``group``, to lower ranks on its twin (see _reverse_group)
        self.downward = reducer._twin(group, timeout_s) if self.size > 1 else group

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
            take turns on gloo's per-connection lock. Ignored by ``backend``.

    Attributes:
        name: the algorithm's name in :data:`REDUCERS`.
        bytes_sent: payload bytes this rank has sent since the reducer was created (counted at each send).
    """

    name: ClassVar[str] = "reducer"
    point_to_point: ClassVar[bool] = True

    def __init__(
        self, *, timeout_s: float = DEFAULT_TIMEOUT_S, tag: int = DEFAULT_TAG, duplex: bool = True
    ) -> None:
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ConfigError(
                f"{self.name}: timeout_s must be a positive number of seconds, got {timeout_s!r}"
            )
        if not isinstance(tag, int) or isinstance(tag, bool) or tag < 0:
            raise ConfigError(f"{self.name}: tag must be a non-negative integer, got {tag!r}")
        if not isinstance(duplex, bool):
            raise ConfigError(f"{self.name}: duplex must be true or false, got {duplex!r}")
        self.timeout_s = float(timeout_s)
        self.tag = tag
        self.duplex = duplex
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
        # a collective step: create the duplex twin group here, in the caller's thread, not the worker's
        self._twin(group, timeout_s)
        future: torch.futures.Future = torch.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=_worker, args=(self._jobs,), name=f"distlearn-{self.name}-reducer", daemon=True
                )
                self._thread.start()
            self._pending += 1
        assert self._jobs is not None
        self._jobs.put((lambda: self._run(tensor, group, timeout_s), future, self._done))
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

    def _reduce(self, flat: torch.Tensor, channel: _Channel) -> None:
        raise NotImplementedError

    def _buffer(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        """A reusable receive buffer of ``numel`` elements (kept, so big calls do not fault pages again)."""
        buffer = self._workspace.get(dtype)
        if buffer is None or buffer.numel() < numel or buffer.device != device:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[dtype] = buffer
        return buffer[:numel]

    # ---- internals --------------------------------------------------------------------------------------

    def _twin(self, group: Any, timeout_s: float | None) -> Any:
        """The group for messages to lower ranks: the duplex twin of ``group``, or ``group`` itself."""
        if not (self.duplex and self.point_to_point) or not dist.is_initialized():
            return group
        if dist.get_world_size(group) < 2:
            return group
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            return _reverse_group(group, timeout_s)
        except Exception as error:  # rendezvous of the twin group: a peer that is gone or late
            raise CommError(
                f"{self.name} allreduce: rank {dist.get_rank(group)} could not create the second process "
                f"group for duplex exchanges ({type(error).__name__}: {_backend_message(error)}); a peer may "
                "have died, or pass duplex=False"
            ) from error

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> torch.Tensor:
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"{self.name}: timeout_s must be positive, got {timeout_s!r}")
        if not dist.is_initialized():
            raise CommError(
                f"{self.name} allreduce: no process group; call distlearn.launch.init_distributed() "
                "(or torch.distributed.init_process_group) first"
            )
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        channel = _Channel(self, group, self.timeout_s if timeout_s is None else float(timeout_s))
        if channel.size > 1 and work.numel() > 0:
            self._reduce(work.view(-1), channel)
        if work is not tensor:
            tensor.copy_(work)
        return tensor


def _worker(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        run, future, done = job
        try:
            result = run()
        except BaseException as error:  # noqa: BLE001 -- handed to the caller through the future
            done()
            future.set_exception(error)
        else:
            done()
            future.set_result(result)


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

    def _reduce(self, flat: torch.Tensor, channel: _Channel) -> None:
        self._count(flat, channel.group)
        work = dist.all_reduce(flat, group=channel.group, async_op=True)
        channel.wait(_Op(work, -1, False, "dist.all_reduce"))

    def _count(self, tensor: torch.Tensor, group: Any) -> None:
        size = dist.get_world_size(group)
        self.bytes_sent += (2 * (size - 1) * tensor.numel() // size) * tensor.element_size()


class _Segmented(Reducer):
    """A reducer that pipelines ``segment_bytes`` segments (None: one segment, the unpipelined algorithm)."""

    def __init__(
        self,
        *,
        segment_bytes: int | None = 4 << 20,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tag: int = DEFAULT_TAG,
        duplex: bool = True,
    ) -> None:
        super().__init__(timeout_s=timeout_s, tag=tag, duplex=duplex)
        if segment_bytes is not None and (
            not isinstance(segment_bytes, int) or isinstance(segment_bytes, bool) or segment_bytes <= 0
        ):
            raise ConfigError(
                f"{self.name}: segment_bytes must be a positive integer (e.g. 4194304 for 4 MiB), "
                f"got {segment_bytes!r}"
            )
        self.segment_bytes = segment_bytes

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

    def _reduce(self, flat: torch.Tensor, channel: _Channel) -> None:
        size, rank = channel.size, channel.rank
        right, left = (rank + 1) % size, (rank - 1) % size
        bounds = chunk_bounds(flat.numel(), size)
        chunks = [flat[start:stop] for start, stop in bounds]
        step = None if self.segment_bytes is None else max(1, self.segment_bytes // flat.element_size())

        def segments(chunk: int) -> list[tuple[int, int]]:
            length = chunks[chunk].numel()
            width = length if step is None else step
            return [(a, min(a + width, length)) for a in range(0, length, max(width, 1))]

        plans = [segments(c) for c in range(size)]
        longest = chunks[0].numel()  # chunk 0 is the longest
        received = self._buffer(flat.dtype, (2 if size > 2 else 1) * longest, flat.device)
        rs_recv: dict[tuple[int, int], _Op] = {}
        rs_send: dict[tuple[int, int], _Op] = {}
        ag_recv: dict[tuple[int, int], _Op] = {}
        sends: list[_Op] = []

        def what(chunk: int, k: int, phase: str, s: int) -> str:
            part = f" segment {k}" if len(plans[chunk]) > 1 else ""
            return f"chunk {chunk}{part} ({phase} step {s})"

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
        self, *, timeout_s: float = DEFAULT_TIMEOUT_S, tag: int = DEFAULT_TAG, duplex: bool = True
    ) -> None:
        super().__init__(segment_bytes=None, timeout_s=timeout_s, tag=tag, duplex=duplex)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timeout_s={self.timeout_s:g})"


class TreeReducer(_Segmented):
    """Binomial-tree reduce to rank 0, then binomial-tree broadcast from rank 0, pipelined over segments.

    Paper: Thakur et al. (2005), sections 4.1 (broadcast) and 4.3 (reduce). Reduce: for mask = 1, 2, 4, ...,
    a rank whose bit ``mask`` is set sends its partial sum to ``rank - mask`` and is done; otherwise it
    receives from ``rank + mask`` (if that rank exists) and adds. Broadcast: the same tree backwards, each
    rank receiving from its parent and then sending to its children (all children at once). Unsegmented
    time ``2 ceil(log2 p) (alpha + n beta) + ceil(log2 p) n gamma``; every non-root rank sends n bytes in
    the reduce, every rank n bytes per child in the broadcast (``2(p-1) n`` in total).

    Segmenting (``segment_bytes``, default 4 MiB): the vector is cut into segments that flow through both
    trees one after another, as NCCL's tree does: a rank passes segment k up as soon as its children's
    parts of it are added, and passes segment k - 1 down meanwhile, so the reduce (towards lower ranks)
    and the broadcast (towards higher ranks) use the two directions of each link at once, and the
    ``2 log2 p`` full-vector hops on the critical path become about ``n beta`` plus ``2 log2 p`` segment
    hops. ``segment_bytes=None`` is the textbook, unpipelined tree. Receives are posted up front (into
    one buffer of n elements per child, and for the broadcast straight into the tensor: a parent can only
    send segment k down after it has received this rank's segment k, so the buffer is free by then).
    """

    name = "tree"

    def _reduce(self, flat: torch.Tensor, channel: _Channel) -> None:
        size, rank, n = channel.size, channel.rank, flat.numel()
        lowest = rank & -rank if rank else 1 << size.bit_length()  # the root has every mask below it
        parent = rank - lowest if rank else None
        masks = [1 << k for k in range(size.bit_length()) if (1 << k) < lowest and rank + (1 << k) < size]
        children = [rank + mask for mask in masks]  # reduce order: mask 1, 2, 4, ...
        width = n if self.segment_bytes is None else max(1, self.segment_bytes // flat.element_size())
        segments = [(a, min(a + width, n)) for a in range(0, n, max(width, 1))]
        incoming = self._buffer(flat.dtype, len(children) * n, flat.device) if children else None

        def what(k: int, part: str, mask: int) -> str:
            piece = f"segment {k} of " if len(segments) > 1 else ""
            return f"{piece}{part} (mask {mask})"

        from_children = {
            (c, k): channel.irecv(
                incoming[c * n + a : c * n + b], child, what(k, "the partial sum (reduce)", masks[c])
            )
            for k, (a, b) in enumerate(segments)
            for c, child in enumerate(children)
        }  # fmt: skip
        from_parent = (
            [channel.irecv(flat[a:b], parent, what(k, "the result (broadcast)", lowest)) for k, (a, b) in
             enumerate(segments)]
            if parent is not None
            else []
        )  # fmt: skip
        sends: list[_Op] = []

        def pass_down(k: int) -> None:
            a, b = segments[k]
            for mask, child in zip(reversed(masks), reversed(children), strict=True):
                sends.append(channel.isend(flat[a:b], child, what(k, "the result (broadcast)", mask)))

        for k, (a, b) in enumerate(segments):
            for c in range(len(children)):
                channel.wait(from_children.pop((c, k)))
                flat[a:b].add_(incoming[c * n + a : c * n + b])
            if parent is None:
                pass_down(k)  # the root holds the full sum of segment k
                continue
            sends.append(channel.isend(flat[a:b], parent, what(k, "the partial sum (reduce)", lowest)))
            if k > 0:  # segment k - 1 comes down while segment k goes up
                channel.wait(from_parent[k - 1])
                pass_down(k - 1)
        if parent is not None and segments:
            channel.wait(from_parent[-1])
            pass_down(len(segments) - 1)
        for op in sends:
            channel.wait(op)
        assert not from_children


class RabenseifnerReducer(Reducer):
    """Recursive-halving reduce-scatter followed by recursive-doubling all-gather (Rabenseifner's algorithm).

    Papers: R. Rabenseifner, "Optimization of collective reduction operations", ICCS 2004; Thakur et al.
    (2005), section 4.4. With ``p'`` a power of two: in step j = 1..log2 p', rank r exchanges with
    ``r xor p'/2**j`` the half of its current range it gives away, and adds the half it keeps; after
    log2 p' steps it holds the sum of block r (blocks of ``n/p'`` elements, sizes differing by at most one).
    The all-gather reverses the steps, doubling the range each time, received directly into the tensor.
    Time ``2 log2 p' alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma``.

    Non-power-of-two p (``p = p' + r``, ``r < p'``): before, each of the first ``2r`` even ranks sends its
    whole vector to the next odd rank (which adds it) and waits; after, the odd rank sends it the result.
    This adds ``2 (alpha + n beta) + n gamma`` (Thakur et al.'s simple variant, not Rabenseifner & Träff's
    halves-exchanging one).
    """

    name = "rabenseifner"

    def _reduce(self, flat: torch.Tensor, channel: _Channel) -> None:
        size, rank = channel.size, channel.rank
        n = flat.numel()
        active = 1 << (size.bit_length() - 1)  # p', the largest power of two <= p
        extra = size - active
        if rank < 2 * extra:
            if rank % 2 == 0:
                channel.wait(channel.isend(flat, rank + 1, "the whole vector (fold-in pre-step)"))
                virtual = -1
            else:
                incoming = self._buffer(flat.dtype, n, flat.device)
                channel.wait(channel.irecv(incoming, rank - 1, "the whole vector (fold-in pre-step)"))
                flat.add_(incoming)
                virtual = rank // 2
        else:
            virtual = rank - extra

        def real(v: int) -> int:
            return 2 * v + 1 if v < extra else v + extra

        if virtual >= 0:
            offsets = [start for start, _ in chunk_bounds(n, active)] + [n]
            incoming = self._buffer(flat.dtype, offsets[active // 2], flat.device)  # the largest half
            low, high = 0, active
            steps = []
            mask = active >> 1
            while mask:  # recursive halving: distance p'/2, p'/4, ..., 1
                middle = (low + high) // 2
                lower, upper = (low, middle), (middle, high)
                keep, give = (upper, lower) if virtual & mask else (lower, upper)
                steps.append((keep, give, real(virtual ^ mask), mask))
                k0, k1 = offsets[keep[0]], offsets[keep[1]]
                g0, g1 = offsets[give[0]], offsets[give[1]]
                label = f"(halving, distance {mask})"
                receive = channel.irecv_nonempty(
                    incoming[: k1 - k0], steps[-1][2], f"{_blocks(keep)} {label}"
                )
                send = channel.isend_nonempty(flat[g0:g1], steps[-1][2], f"{_blocks(give)} {label}")
                if receive is not None:
                    channel.wait(receive)
                    flat[k0:k1].add_(incoming[: k1 - k0])
                channel.wait_all([send])
                low, high = keep
                mask >>= 1
            for keep, give, partner, mask in reversed(steps):  # recursive doubling, received in place
                label = f"(doubling, distance {mask})"
                receive = channel.irecv_nonempty(
                    flat[offsets[give[0]] : offsets[give[1]]], partner, f"{_blocks(give)} {label}"
                )
                send = channel.isend_nonempty(
                    flat[offsets[keep[0]] : offsets[keep[1]]], partner, f"{_blocks(keep)} {label}"
                )
                channel.wait_all([receive, send])
        if rank < 2 * extra:
            if rank % 2 == 1:
                channel.wait(channel.isend(flat, rank - 1, "the result (fold-out post-step)"))
            else:
                channel.wait(channel.irecv(flat, rank + 1, "the result (fold-out post-step)"))


def _blocks(span: tuple[int, int]) -> str:
    return f"block {span[0]}" if span[1] - span[0] == 1 else f"blocks {span[0]}..{span[1] - 1}"


REDUCERS: dict[str, type[Reducer]] = {
    "backend": BackendReducer,
    "ring": RingReducer,
    "tree": TreeReducer,
    "rabenseifner": RabenseifnerReducer,
    "segmented-ring": SegmentedRingReducer,
}
"""Every allreduce algorithm by name, for ``--reducer`` and :func:`create_reducer`."""


def create_reducer(name: str, **options: Any) -> Reducer:
    """The reducer called ``name`` (a key of :data:`REDUCERS`) built with ``options``.

    Options: ``timeout_s`` and ``tag`` for every reducer, ``segment_bytes`` for ``segmented-ring`` and
    ``tree``.
    Does not touch the process group, so it can validate a configuration before the job starts.
    """
    if name not in REDUCERS:
        raise ConfigError(f"unknown reducer {name!r}; choose one of: {', '.join(REDUCERS)}")
    cls = REDUCERS[name]
    try:
        return cls(**options)
    except TypeError as error:
        accepted = _options_of(cls.__init__)
        unknown = ", ".join(sorted(set(options) - set(accepted))) or "these options"
        raise ConfigError(
            f"reducer {name!r} does not take {unknown}; its options are: {', '.join(accepted)}"
        ) from error


def _options_of(function: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]
