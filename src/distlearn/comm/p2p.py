"""Point-to-point messages on c10d: a small fixed header tensor, then (optionally) a flat payload tensor.

The parameter-server core (:mod:`distlearn.comm.paramserver`: the ps strategy, async EASGD's centre,
Gorila's server) and any other role-based method talk through this module: no ``torch.distributed.rpc``,
no pickling, no sockets of our own -- only ``isend``/``irecv`` of the process group's backend (gloo on CPU),
so one machine and many machines are the same code.

A message is a ``float64`` header of :data:`HEADER_SIZE` numbers ::

    [kind, version, step, length, lr, staleness, flag, sender]

followed, when ``length > 0``, by a ``float32`` payload of ``length`` numbers sent with the next tag of the
same channel. ``float64`` holds integers exactly up to 2**53, so versions, steps and lengths are exact.
Requests (worker -> server) travel on tags ``REQUEST``/``REQUEST + 1``, replies (server -> worker) on
``REPLY``/``REPLY + 1``: a header is always matched with its own payload even when a background thread
(the heartbeat) sends headers on the same pair, because the backend keeps the order per (peer, tag).

Timeouts: every wait carries a deadline; a peer that died (the backend reports "connection closed") or
stays silent raises :class:`distlearn.errors.CommError` naming this rank, the peer and the operation.
Cautions learnt from gloo (torch 2.x): a wait that times out closes *every* connection of the process
("Application timeout caused pair closure"), not only the one waited on, and the receive is not cancelled;
a receive from any source fails as a whole when one peer's connection resets while a message of that peer
is being read into it; and a receive's ``is_completed()`` stays false until it is waited on. So a server
that must outlive any of its workers (:class:`PeerReceives`) posts one receive per worker, each waited on
by a thread of its own without a deadline: a worker's death fails only that worker's receive, at once
(its connection closes), and silence is measured by the server's clock, never by a timed-out wait.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from distlearn.errors import CommError, ConfigError

__all__ = ["HEADER_SIZE", "Header", "Kind", "PeerReceives", "REPLY", "REQUEST", "Transport"]

HEADER_SIZE = 8
"""Numbers in a header: kind, version, step, length, lr, staleness, flag, sender."""

REQUEST = 10
"""Tag of request headers (worker -> server); their payloads use ``REQUEST + 1``."""
REPLY = 20
"""Tag of reply headers (server -> worker); their payloads use ``REPLY + 1``."""


class Kind(IntEnum):
    """What a message is."""

    INIT = 1  # worker -> server: my initial shard (payload); reply PARAMS
    PUSH = 2  # worker -> server: a gradient computed on `version` (payload); reply PARAMS
    PARAMS = 3  # server -> worker: the shard at `version` (payload); staleness/flag describe the push
    HEARTBEAT = 4  # worker -> server: still alive (no payload, no reply)
    CHECKPOINT = 5  # worker -> server: save your state under `step`; reply ACK
    ACK = 6  # server -> worker: done (no payload)
    DONE = 7  # worker -> server: I will send nothing more (no reply)
    ERROR = 8  # server -> worker: request refused, `flag` says why (no payload)
    ACTIVATION = 9  # dni stage k -> k+1: the output h_k of `step`, computed at stage version `version`
    GRADIENT = 10  # dni stage k -> k-1: dL/dh_{k-1} of `step` (true, or from k's synthetic gradient)
    STATE = 11  # dni stage -> rank 0: the stage's weights and its counters (payload)


@dataclass
class Header:
    """The fixed-size header of every message (see the module docstring for the layout)."""

    kind: Kind
    version: int = 0
    step: int = 0
    length: int = 0
    lr: float = 0.0
    staleness: float = 0.0
    flag: int = 0
    sender: int = -1

    def to_tensor(self) -> torch.Tensor:
        values = [self.kind, self.version, self.step, self.length, self.lr, self.staleness]
        return torch.tensor([*values, self.flag, self.sender], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Header:
        v = tensor.tolist()
        try:
            kind = Kind(int(v[0]))
        except ValueError:
            raise CommError(
                f"received a message of unknown kind {v[0]!r}: a peer runs another protocol"
            ) from None
        return cls(kind, int(v[1]), int(v[2]), int(v[3]), float(v[4]), float(v[5]), int(v[6]), int(v[7]))


def backend_reason(error: BaseException) -> str:
    """The backend's reason in a few words: ``Connection closed by peer [127.0.0.1]:37039`` out of gloo's
    ``[/path/pair.cc:553] Connection closed by peer [...]. This is typically caused by ...``."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically", 1)[0][:200]


_FOREVER = timedelta(days=365)
"""The deadline of a wait that must not time out (a gloo timeout would close every connection)."""


class PeerReceives:
    """One receive of a request header posted to each peer alone, each waited on by a thread of its own.

    :meth:`next` hands over what arrived first: ``(peer, header, None)``, or ``(peer, None, reason)`` when
    that peer's connection failed (it died: its receive fails at once, the other peers' do not). After a
    header, the peer's next receive is posted only when the caller says so (:meth:`again`), so a peer has
    one request in hand at a time and the caller reads its payload first; :meth:`forget` posts no more for
    a peer (done, or lost). A receive still posted to a peer that stays silent cannot be cancelled: its
    thread waits until the peer speaks, dies, or this process ends (it is a daemon).
    """

    def __init__(self, transport: Transport, peers: list[int]) -> None:
        self.transport = transport
        self._arrived: queue.SimpleQueue[tuple[int, Any, Any]] = queue.SimpleQueue()
        self._inbox: dict[int, queue.SimpleQueue[Any]] = {}
        for peer in peers:
            self._inbox[peer] = queue.SimpleQueue()
            name = f"distlearn-receive-{peer}"
            threading.Thread(target=self._wait_for, args=(peer,), name=name, daemon=True).start()
            self.again(peer)

    def again(self, peer: int) -> None:
        """Post the next receive of a header from ``peer``."""
        buffer = torch.empty(HEADER_SIZE, dtype=torch.float64)
        try:
            work = dist.irecv(buffer, src=peer, tag=REQUEST, group=self.transport.group)
        except RuntimeError as error:
            self._arrived.put((peer, None, error))
            return
        self._inbox[peer].put((work, buffer))

    def forget(self, peer: int) -> None:
        """Post nothing more for ``peer`` (its thread ends once its last receive, if any, completes)."""
        inbox = self._inbox.pop(peer, None)
        if inbox is not None:
            inbox.put(None)

    def close(self) -> None:
        for peer in list(self._inbox):
            self.forget(peer)

    def _wait_for(self, peer: int) -> None:
        inbox = self._inbox[peer]
        while (posted := inbox.get()) is not None:
            work, buffer = posted
            try:
                work.wait(timeout=_FOREVER)
            except RuntimeError as error:
                self._arrived.put((peer, None, error))
                return
            self._arrived.put((peer, buffer, None))

    def next(self, timeout_s: float) -> tuple[int, Header | None, str | None] | None:
        """What arrived first: ``(peer, header, None)``, ``(peer, None, the backend's reason)`` when that
        peer's connection failed, or None when nothing arrived within ``timeout_s``."""
        try:
            peer, buffer, error = self._arrived.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if error is not None:
            return peer, None, backend_reason(error)
        with self.transport._lock:
            self.transport.bytes_received += HEADER_SIZE * 8
        return peer, Header.from_tensor(buffer), None


class Transport:
    """Send and receive header(+payload) messages with deadlines and byte counts.

    Args:
        rank: this process's rank (for error messages; the group's rank is used for the wire).
        timeout_s: deadline of every wait.
        group: process group (default: the default group).

    ``send`` may be called from two threads (the main loop and a heartbeat); the counters are guarded.
    """

    def __init__(self, rank: int, *, timeout_s: float, group: Any = None) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"the point-to-point timeout must be positive, got {timeout_s}")
        self.rank = rank
        self.timeout_s = timeout_s
        self.group = group
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.shared_bytes = 0  # payload bytes that went through shared memory (:mod:`distlearn.comm.shm`)
        self._lock = threading.Lock()

    def count_shared(self, *, sent: int = 0, received: int = 0) -> None:
        """Count a payload that went through a shared-memory block: in the byte totals, and separately."""
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.shared_bytes += sent + received

    def _failed(self, what: str, peer: int, error: BaseException) -> CommError:
        return CommError(f"rank {self.rank}: {what} from rank {peer} failed ({backend_reason(error)})")

    def _wait(self, work: Any, peer: int, what: str, timeout_s: float | None = None) -> None:
        deadline = self.timeout_s if timeout_s is None else timeout_s
        try:
            work.wait(timeout=timedelta(seconds=deadline))
        except RuntimeError as error:
            if "Timed out" in str(error):
                raise CommError(
                    f"rank {self.rank}: {what} with rank {peer} timed out after {deadline:g} s "
                    f"({backend_reason(error)}); the peer is stuck or has died -- check its log, or raise "
                    "--comm-timeout if it is only slow"
                ) from error
            raise CommError(
                f"rank {self.rank}: {what} with rank {peer} failed ({backend_reason(error)}); the peer has "
                "probably died -- check its log"
            ) from error

    def isend(self, peer: int, header: Header, payload: torch.Tensor | None = None, *, tag: int) -> list[Any]:
        """Start sending a message on channel ``tag``; returns the works to pass to :meth:`finish`.

        ``payload=None`` with ``header.length > 0`` sends the header alone: its payload went another way
        (a shared-memory block the peer reads).
        """
        head = header.to_tensor()
        if payload is not None and payload.numel() != header.length:
            raise ValueError(f"header says {header.length} numbers but the payload has {payload.numel()}")
        try:
            works = [dist.isend(head, dst=peer, tag=tag, group=self.group)]
            if payload is not None and payload.numel():
                works.append(dist.isend(payload, dst=peer, tag=tag + 1, group=self.group))
        except RuntimeError as error:
            raise CommError(
                f"rank {self.rank}: sending {header.kind.name} to rank {peer} failed "
                f"({backend_reason(error)}); the peer has probably died"
            ) from error
        with self._lock:
            self.bytes_sent += head.numel() * 8 + (
                0 if payload is None else payload.numel() * payload.element_size()
            )
            self.messages_sent += 1
        return [(work, peer, f"sending {header.kind.name}") for work in works]

    def finish(self, pending: list[Any], timeout_s: float | None = None) -> None:
        """Wait for the works of :meth:`isend` calls."""
        for work, peer, what in pending:
            self._wait(work, peer, what, timeout_s)

    def send(
        self, peer: int, header: Header, payload: torch.Tensor | None = None, *, tag: int,
        timeout_s: float | None = None,
    ) -> None:  # fmt: skip
        """Send one message and wait until it is handed to the transport."""
        self.finish(self.isend(peer, header, payload, tag=tag), timeout_s)

    def recv_header(self, peer: int, *, tag: int, what: str, timeout_s: float | None = None) -> Header:
        """Receive one header from ``peer`` on channel ``tag`` (CommError on death or timeout)."""
        buffer = torch.empty(HEADER_SIZE, dtype=torch.float64)
        try:
            work = dist.irecv(buffer, src=peer, tag=tag, group=self.group)
        except RuntimeError as error:
            raise self._failed(what, peer, error) from error
        self._wait(work, peer, what, timeout_s)
        with self._lock:
            self.bytes_received += HEADER_SIZE * 8
        return Header.from_tensor(buffer)

    def recv_payload(self, peer: int, out: torch.Tensor, *, tag: int, what: str) -> torch.Tensor:
        """Receive the payload that follows a header on channel ``tag`` into ``out``."""
        if out.numel() == 0:
            return out
        try:
            work = dist.irecv(out, src=peer, tag=tag + 1, group=self.group)
        except RuntimeError as error:
            raise self._failed(what, peer, error) from error
        self._wait(work, peer, what)
        with self._lock:
            self.bytes_received += out.numel() * out.element_size()
        return out

    def post_recv(self, peer: int, out: torch.Tensor, *, tag: int, what: str) -> tuple[Any, int, str]:
        """Post a receive into ``out`` now (before sending the request it answers) and return its handle.

        gloo hands a message over only once the receiver has posted its receive, so a process that sends
        to several peers and then waits for their answers must post the receives first, or two of them can
        wait for each other.
        """
        try:
            work = dist.irecv(out, src=peer, tag=tag, group=self.group)
        except RuntimeError as error:
            raise self._failed(what, peer, error) from error
        return work, peer, what

    def complete(self, handle: tuple[Any, int, str], out: torch.Tensor) -> torch.Tensor:
        """Wait for a receive of :meth:`post_recv` (CommError naming the peer on death or timeout)."""
        work, peer, what = handle
        self._wait(work, peer, what)
        with self._lock:
            self.bytes_received += out.numel() * out.element_size()
        return out

    def requests(self, peers: list[int]) -> PeerReceives:
        """Post one receive of a request header to each of ``peers`` (see :class:`PeerReceives`)."""
        return PeerReceives(self, peers)
