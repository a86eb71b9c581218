"""The serving loop every parameter server runs, and the contract of the policy that gives it its meaning."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from distlearn.comm.p2p import REPLY, REQUEST, Header, Kind, PeerReceives, Transport
from distlearn.comm.paramserver.protocol import ERROR_LAYOUT, PushFlag, ReplyFlag
from distlearn.comm.paramserver.shared import SharedPeers
from distlearn.errors import CommError

__all__ = ["PeerFailed", "ServerPolicy", "ServingLoop"]


class PeerFailed(CommError):
    """A payload from ``peer`` or a reply to it failed: the serving loop loses that worker and goes on."""

    def __init__(self, peer: int, why: str) -> None:
        super().__init__(why)
        self.peer = peer
        self.why = why


class ServerPolicy(Protocol):
    """What a server does with the requests its :class:`ServingLoop` hands it.

    The loop owns the conversation (who is live, heartbeats, DONE, silence, the shared blocks, replies);
    the policy owns the server's state and what a request does to it.
    """

    def on_request(self, loop: ServingLoop, peer: int, header: Header) -> None:
        """Handle INIT, PUSH, CHECKPOINT (any kind but HEARTBEAT and DONE) from the live worker ``peer``;
        receive its payload with :meth:`ServingLoop.receive` and answer with :meth:`ServingLoop.reply`."""
        ...

    def after_message(self, loop: ServingLoop) -> None:
        """Called after every message and every liveness check (apply a group that is complete, log)."""
        ...

    def on_lost(self, loop: ServingLoop, worker: int, why: str) -> None:
        """``worker`` was dropped from the live set (silent, or could not be answered); raise to stop."""
        ...

    def on_silence(self, loop: ServingLoop, error: CommError | None) -> None:
        """No worker spoke for ``silence_s`` (``error`` is None: a failed connection loses only its worker,
        :meth:`on_lost`): the loop ends after this call; raise to end it with an error instead."""
        ...


class ServingLoop:
    """Serve the workers ``workers`` until every one of them is done, retired or lost.

    One receive of a request header is posted to each live worker (:class:`distlearn.comm.p2p.PeerReceives`)
    and requests are handled one at a time, as they arrive: HEARTBEAT refreshes the sender's clock, DONE
    retires it, everything else goes to the policy. A worker is lost -- dropped from the live set, its
    connection never used again, the others served on -- when its connection fails (it died: at once), when
    a payload or a reply of it fails, or when it is silent for ``worker_silence_s``. A message from a worker
    no longer live is not answered; its payload is drained so the channel stays in step.

    Args:
        transport: the server's transport.
        workers: the ranks it serves.
        policy: the :class:`ServerPolicy`.
        silence_s: how long the loop waits for any message before it calls ``policy.on_silence``.
        worker_silence_s: a live worker not heard from for this long is lost (None: never; the heartbeats
            of the ps workers keep them live while they compute).
    """

    def __init__(
        self,
        transport: Transport,
        workers: Iterable[int],
        policy: ServerPolicy,
        *,
        silence_s: float,
        worker_silence_s: float | None = None,
    ) -> None:
        self.transport = transport
        self.rank = transport.rank
        self.policy = policy
        self.silence_s = silence_s
        self.worker_silence_s = worker_silence_s
        ranks = list(workers)
        self.live = set(ranks)
        self.last_heard = {w: time.monotonic() for w in ranks}
        self.last_step: dict[int, int] = {}  # the step of each worker's last push
        self.done: list[int] = []  # retired: said DONE, or told to stop
        self.dead: list[int] = []  # lost: its connection failed, silent, or could not be answered
        self.lost: list[dict[str, Any]] = []  # per lost worker: rank, seconds, last step, why
        self.shared = SharedPeers()
        self.started = time.monotonic()
        self._receives: PeerReceives | None = None

    # the loop ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        self._receives = self.transport.requests(sorted(self.live))
        try:
            self._serve(self._receives)
        finally:
            self._receives.close()

    def _serve(self, receives: PeerReceives) -> None:
        heard = time.monotonic()  # when any worker last spoke
        tick = min(1.0, self.silence_s, self.worker_silence_s or self.silence_s)
        while self.live:
            arrived = receives.next(tick)
            now = time.monotonic()
            lost = len(self.dead)
            if arrived is not None:
                heard = now
                peer, header, error = arrived
                if error is not None or header is None:
                    receives.forget(peer)
                    self.lose(peer, f"its connection failed ({error})")
                else:
                    self.last_heard[peer] = now
                    if peer in self.live:
                        self._handle(peer, header)
                    else:
                        self.drain(peer, header)
                    if peer in self.live:
                        receives.again(peer)
                    else:
                        receives.forget(peer)
            elif now - heard > self.silence_s:  # nobody spoke for a whole timeout
                self.policy.on_silence(self, None)
                break
            if self.worker_silence_s is not None:
                for worker in sorted(self.live):
                    if now - self.last_heard[worker] > self.worker_silence_s:
                        self.lose(worker, f"silent for {now - self.last_heard[worker]:.1f} s")
            if arrived is not None or len(self.dead) != lost:
                self.policy.after_message(self)

    def _handle(self, peer: int, header: Header) -> None:
        if header.kind == Kind.HEARTBEAT:
            return
        if header.kind == Kind.DONE:
            self.retire(peer)
            return
        if header.kind == Kind.PUSH:
            self.last_step[peer] = header.step
        try:
            self.policy.on_request(self, peer, header)
        except PeerFailed as failure:  # its payload or our reply failed: lost, the others go on
            self.lose(failure.peer, failure.why)

    # membership --------------------------------------------------------------------------------------------

    def retire(self, worker: int) -> None:
        """``worker`` has finished (it said DONE, or the server told it to stop)."""
        self.live.discard(worker)
        self.done.append(worker)
        if self._receives is not None:
            self._receives.forget(worker)

    def lose(self, worker: int, why: str) -> None:
        """Drop ``worker`` from the live set (its pending work still counts; it is just not answered)."""
        if worker not in self.live:
            return
        self.live.discard(worker)
        self.dead.append(worker)
        if self._receives is not None:
            self._receives.forget(worker)
        now = time.time()
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        self.lost.append(
            {"rank": worker, "seconds": round(self.seconds(), 3), "at": at,
             "last_step": self.last_step.get(worker), "why": why}
        )  # fmt: skip
        self.policy.on_lost(self, worker, why)

    def lose_all(self, why: str) -> None:
        for worker in sorted(self.live):
            self.lose(worker, why)

    # payloads and replies ----------------------------------------------------------------------------------

    @staticmethod
    def payload_dtype(header: Header) -> torch.dtype:
        """What the payload of a request is made of: INIT float64 (layout and values), a compressed push
        bytes, anything else float32."""
        if header.kind == Kind.INIT:
            return torch.float64
        if header.kind == Kind.PUSH and header.flag & PushFlag.COMPRESSED:
            return torch.uint8
        return torch.float32

    def receive(
        self, peer: int, header: Header, out: torch.Tensor | None = None, *, what: str = "a payload"
    ) -> torch.Tensor:
        """The payload of ``header`` from ``peer``: the worker's push block itself for a shared push (read it
        before replying: the worker writes it again only after the reply), else received into ``out`` (or a
        new tensor of :meth:`payload_dtype`)."""
        if header.kind == Kind.PUSH and header.flag & PushFlag.SHARED:
            pair = self.shared.get(peer)
            if pair is None or pair.push.tensor.numel() != header.length:
                raise CommError(
                    f"server rank {self.rank}: rank {peer} pushed through a shared block this server has "
                    "not mapped: the processes run different protocol versions"
                )
            block = pair.push.tensor
            self.transport.count_shared(received=block.numel() * block.element_size())
            return block
        if out is None:
            out = torch.empty(header.length, dtype=self.payload_dtype(header))
        try:
            return self.transport.recv_payload(peer, out, tag=REQUEST, what=what)
        except CommError as error:
            raise PeerFailed(peer, f"{what} failed ({str(error)[:200]})") from error

    def drain(self, peer: int, header: Header) -> None:
        """Read and forget the payload of a message from a worker no longer served (a late one)."""
        if header.kind in (Kind.PUSH, Kind.INIT) and header.length and not header.flag & PushFlag.SHARED:
            with contextlib.suppress(PeerFailed):
                self.receive(peer, header, what="a late payload")

    def reply(
        self, worker: int, header: Header, payload: torch.Tensor | None = None, *, shared: bool | None = None
    ) -> bool:
        """Answer ``worker``; False (and the worker lost) if it cannot be reached.

        The payload goes through the worker's shared reply block when the server mapped one (``shared``
        overrides: the answer to the INIT that offers the blocks still goes over the backend).
        """
        if payload is not None and (worker in self.shared if shared is None else shared):
            pair = self.shared.get(worker)
            assert pair is not None
            pair.reply.tensor.copy_(payload)
            self.transport.count_shared(sent=payload.numel() * payload.element_size())
            header.flag = int(header.flag | ReplyFlag.VIA_SHARED)
            payload = None
        try:
            self.transport.send(worker, header, payload, tag=REPLY)
        except CommError as error:
            self.lose(worker, f"could not be answered ({str(error)[:160]})")
            return False
        return True

    def refuse_layout(self, worker: int) -> None:
        """Answer ``worker`` with ERROR: its parameter layout is not the server's."""
        self.reply(worker, Header(Kind.ERROR, flag=ERROR_LAYOUT, sender=self.rank))

    def seconds(self) -> float:
        return time.monotonic() - self.started
