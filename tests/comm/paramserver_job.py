"""One process of the parameter-server core's test job (started by tests/comm/test_paramserver.py).

    RANK=r WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 MASTER_PORT=p LOCAL_RANK=0 python paramserver_job.py OUT

Rank 0 serves an *adding* server (its state ``s`` starts at the first INIT's values; a PUSH of ``g`` does
``s <- s + g`` and is answered with the new ``s`` and the push's staleness) on the core's ServingLoop.
Rank 1 offers shared-memory blocks, rank 2 talks over the backend only. The pushes are ordered through the
job's store: rank 1's INIT, rank 2's INIT, then pushes 1/0, 2/0, 1/1, 2/1. Rank 1 then says DONE; rank 2
says nothing more (alive until the server has ended), so the server has to find it silent. Every rank saves
what it saw to OUT/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distlearn.comm.p2p import REQUEST, Header, Kind, Transport
from distlearn.comm.paramserver import (
    PushFlag,
    ReplyFlag,
    ServerLink,
    ServingLoop,
    SharedPair,
    StalenessBook,
)
from distlearn.errors import CommError, ConfigError
from distlearn.launch import init_distributed, shutdown

NUMEL = 5
WAIT = timedelta(seconds=60)


def push_value(worker: int, push: int) -> float:
    return float(10 * worker + push)


class AddingServer:
    """The test's policy: ``s <- s + g`` per push, staleness in the book, the shared blocks accepted."""

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None
        self.book = StalenessBook()
        self.lost: list[tuple[int, str]] = []
        self.silences = 0

    def on_request(self, loop: ServingLoop, peer: int, header: Header) -> None:
        if header.kind == Kind.INIT:
            values = loop.receive(peer, header).float()
            if self.state is None:
                self.state = values.clone()
            accepted = bool(header.step) and loop.shared.attach(peer, header.step, NUMEL)
            flag = int(ReplyFlag.SHARED_ACCEPTED) if accepted else 0
            reply = Header(Kind.PARAMS, version=self.book.version, length=NUMEL, flag=flag, sender=0)
            loop.reply(peer, reply, self.state, shared=False)
            return
        assert header.kind == Kind.PUSH and self.state is not None
        gradient = loop.receive(peer, header)
        self.book.received()
        staleness = self.book.staleness(header.version)
        self.state.add_(gradient)
        self.book.applied([(peer, staleness)])
        reply = Header(Kind.PARAMS, version=self.book.version, length=NUMEL, staleness=staleness, sender=0)
        loop.reply(peer, reply, self.state)

    def after_message(self, loop: ServingLoop) -> None:
        pass

    def on_lost(self, loop: ServingLoop, worker: int, why: str) -> None:
        self.lost.append((worker, why))

    def on_silence(self, loop: ServingLoop, error: CommError | None) -> None:
        self.silences += 1
        loop.lose_all("silent" if error is None else "its connection closed")


def refused(header: Header) -> Exception:
    return ConfigError("refused")


def worker(rank: int, store: dist.Store, out: Path) -> None:
    transport = Transport(rank, timeout_s=30)
    link = ServerLink(transport, 0, NUMEL)
    if rank == 2:
        store.wait(["init/1"], WAIT)
    offer = SharedPair.offer(NUMEL) if rank == 1 else None
    posted = link.post("the initial pull")
    values = torch.arange(NUMEL, dtype=torch.float64) * rank
    header = Header(Kind.INIT, step=offer.token if offer else 0, length=NUMEL, sender=rank)
    transport.finish(link.send(header, values))
    answer = link.receive(posted, refused)
    accepted = bool(answer.flag & ReplyFlag.SHARED_ACCEPTED)
    seen = [(answer.version, 0.0, link.flat.clone())]  # the answer to INIT came over the backend
    if offer is not None:
        offer.unlink()
        if accepted:
            link.accept(offer)
    store.set(f"init/{rank}", "1")
    for push in range(2):
        previous = f"pulled/2/{push - 1}" if rank == 1 else f"pulled/1/{push}"
        store.wait(["init/2", previous] if push or rank == 2 else ["init/2"], WAIT)
        if rank == 2:
            transport.send(0, Header(Kind.HEARTBEAT, sender=rank), tag=REQUEST)  # no reply, no effect
        posted = link.post(f"push {push}")
        gradient = torch.full((NUMEL,), push_value(rank, push))
        if link.shared is not None:
            link.shared.push.tensor.copy_(gradient)
            transport.count_shared(sent=4 * NUMEL)
            flag = int(PushFlag.SHARED)  # the gradient is in the block: only the header travels
            header = Header(Kind.PUSH, version=link.version, length=NUMEL, flag=flag, sender=rank)
            transport.finish(link.send(header))
        else:
            header = Header(Kind.PUSH, version=link.version, length=NUMEL, sender=rank)
            transport.finish(link.send(header, gradient))
        answer = link.receive(posted, refused)
        seen.append((answer.version, answer.staleness, link.flat.clone()))
        store.set(f"pulled/{rank}/{push}", "1")
    result = {"seen": seen, "accepted": accepted, "shared_bytes": transport.shared_bytes}
    torch.save(result, out / f"rank{rank}.pt")
    if rank == 1:
        transport.send(0, Header(Kind.DONE, sender=rank), tag=REQUEST)
        store.set("done/1", "1")
    else:
        store.wait(["done/1"], WAIT)
        # no DONE and no death (a death closes the connection, which the server sees at once): silent and
        # alive until the server has ended, so it must find this worker silent with its receive still posted
        store.wait(["server/saved"], WAIT)
        os._exit(0)


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    store = dist.distributed_c10d._get_default_store()
    try:
        if context.rank == 0:
            policy = AddingServer()
            transport = Transport(0, timeout_s=30)
            loop = ServingLoop(transport, [1, 2], policy, silence_s=5.0, worker_silence_s=20.0)
            loop.run()
            torch.save(
                {
                    "updates": policy.book.updates,
                    "pushes": policy.book.pushes,
                    "state": policy.state,
                    "done": loop.done,
                    "dead": loop.dead,
                    "lost": [w for w, _ in policy.lost],
                    "why": [why for _, why in policy.lost],
                    "silences": policy.silences,
                    "shared_bytes": loop.transport.shared_bytes,
                },
                out / "rank0.pt",
            )
            store.set("server/saved", "1")
        else:
            worker(context.rank, store, out)
    finally:
        if context.rank != 2:
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
