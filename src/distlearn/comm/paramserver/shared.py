"""The shared-memory path of a worker-server pair on one machine (blocks of :mod:`distlearn.comm.shm`).

A worker offers two blocks per server in its INIT (their token in the header's ``step``): the *push* block
it writes its gradient into and the *reply* block the server writes the weights into. A server on the same
machine maps both (which unlinks their names) and says so in its answer; from then on only headers travel
over the backend between the two. A server on another machine finds no such files and the pair keeps
sending payloads over the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distlearn.comm.shm import SharedBlock, new_token

__all__ = ["SharedPair", "SharedPeers"]


@dataclass
class SharedPair:
    """The push and reply blocks of one worker-server pair, named by ``token``."""

    token: int
    push: SharedBlock
    reply: SharedBlock

    @classmethod
    def offer(cls, numel: int) -> SharedPair | None:
        """New blocks of ``numel`` numbers (worker side); None where there is no room or nothing to share."""
        if numel <= 0:
            return None
        token = new_token()
        push = SharedBlock.create(token, "push", numel)
        reply = SharedBlock.create(token, "reply", numel) if push is not None else None
        if push is None or reply is None:
            if push is not None:
                push.unlink()
            return None
        return cls(token, push, reply)

    @classmethod
    def attach(cls, token: int, numel: int) -> SharedPair | None:
        """The worker's blocks (server side), unlinked once mapped; None when they are not on this machine."""
        push = SharedBlock.attach(token, "push", numel)
        reply = SharedBlock.attach(token, "reply", numel)
        if push is None or reply is None:
            return None
        return cls(token, push, reply)

    def unlink(self) -> None:
        """Remove both names (idempotent); the mappings stay valid where they exist."""
        self.push.unlink()
        self.reply.unlink()


class SharedPeers:
    """A server's table of the workers whose blocks it mapped."""

    def __init__(self) -> None:
        self.pairs: dict[int, SharedPair] = {}

    def __contains__(self, worker: object) -> bool:
        return worker in self.pairs

    def get(self, worker: int) -> SharedPair | None:
        return self.pairs.get(worker)

    def attach(self, worker: int, token: int, numel: int) -> bool:
        """Map ``worker``'s blocks offered under ``token``; False if they are not on this machine."""
        pair = SharedPair.attach(token, numel)
        if pair is None:
            return False
        self.pairs[worker] = pair
        return True

    def is_push_block(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is some worker's push block (not a buffer the server may reuse)."""
        return any(tensor is pair.push.tensor for pair in self.pairs.values())
