"""The worker's end of the conversation with one server: its reply buffers, its shared blocks, its version."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distlearn.comm.p2p import HEADER_SIZE, REPLY, REQUEST, Header, Kind, Transport
from distlearn.comm.paramserver.protocol import ReplyFlag
from distlearn.comm.paramserver.shared import SharedPair
from distlearn.errors import CommError

__all__ = ["Heartbeat", "PostedReply", "ServerLink"]


@dataclass
class PostedReply:
    """The receives of one reply, posted before the request that it answers was sent."""

    header: Any
    payload: Any  # None: no payload travels (an empty shard, or the weights arrive in the shared block)


class ServerLink:
    """A worker's link to the server ``server`` whose state (or shard of it) has ``numel`` numbers.

    Every reply lands in the same buffers (:attr:`flat`; the shared reply block once the server accepted the
    worker's blocks), which is safe because a worker has one request to a server in flight at a time.
    """

    def __init__(self, transport: Transport, server: int, numel: int, *, pin: bool = False) -> None:
        self.transport = transport
        self.server = server
        self.head = torch.empty(HEADER_SIZE, dtype=torch.float64)
        # pin: page-locked, for a worker that copies the replies on to a GPU (needs CUDA)
        self.flat = torch.empty(numel, dtype=torch.float32, pin_memory=pin)
        self.shared: SharedPair | None = None
        self.version = 0  # of the server's state in the last reply

    def accept(self, pair: SharedPair) -> None:
        """The server mapped ``pair``: from now on its replies arrive in the reply block."""
        self.shared = pair
        self.flat = pair.reply.tensor

    def post(self, what: str) -> PostedReply:
        """Post the receives of the next reply (before sending the request: gloo hands a message over only
        once its receive is posted, and a worker talking to several servers must not wait on one of them)."""
        head = self.transport.post_recv(self.server, self.head, tag=REPLY, what=f"{what} (reply header)")
        payload = (
            self.transport.post_recv(self.server, self.flat, tag=REPLY + 1, what=f"{what} (parameters)")
            if self.flat.numel() and self.shared is None
            else None
        )
        return PostedReply(head, payload)

    def send(self, header: Header, payload: torch.Tensor | None = None) -> list[Any]:
        """Start sending a request (see :meth:`distlearn.comm.p2p.Transport.isend`)."""
        return self.transport.isend(self.server, header, payload, tag=REQUEST)

    def receive(self, posted: PostedReply, refused: Callable[[Header], Exception]) -> Header:
        """Wait for the reply of :meth:`post`: PARAMS of :attr:`flat`'s length, its weights in :attr:`flat`.

        An ERROR reply raises ``refused(header)``; anything else unexpected a CommError.
        """
        header = Header.from_tensor(self.transport.complete(posted.header, self.head))
        if header.kind == Kind.ERROR:
            raise refused(header)
        if header.kind != Kind.PARAMS or header.length != self.flat.numel():
            raise CommError(
                f"rank {self.transport.rank}: expected PARAMS of {self.flat.numel()} numbers from server "
                f"rank {self.server}, got {header.kind.name} of {header.length}: the processes run different "
                "protocol versions"
            )
        if posted.payload is not None:
            self.transport.complete(posted.payload, self.flat)
        elif self.shared is not None:
            if not header.flag & ReplyFlag.VIA_SHARED:
                raise CommError(
                    f"rank {self.transport.rank}: server rank {self.server} answered without the shared "
                    "block it accepted: the processes run different protocol versions"
                )
            self.transport.count_shared(received=self.flat.numel() * self.flat.element_size())
        self.version = header.version
        return header


class Heartbeat:
    """A background thread that sends HEARTBEAT (a header, no reply) to each of ``servers`` every
    ``interval_s`` seconds, so that a worker loading its data or computing is not taken for lost.

    Started when the worker joins the job (before its data is loaded: a server counts a worker's silence from
    its own start). A failed send ends the thread and is kept in :attr:`error`; the worker's next request to
    that server fails too and reports it.
    """

    def __init__(self, transport: Transport, servers: list[int], interval_s: float) -> None:
        self.transport = transport
        self.servers = servers
        self.interval_s = interval_s
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start beating (nothing if it beats already)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="distlearn-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop beating; waits up to ``timeout_s`` for a send in progress."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _beat(self) -> None:
        beat = Header(Kind.HEARTBEAT, sender=self.transport.rank)
        while not self._stop.wait(self.interval_s):
            try:
                for server in self.servers:
                    self.transport.send(server, beat, tag=REQUEST)
            except BaseException as error:  # the main thread reports the dead server on its next request
                self.error = error
                return
