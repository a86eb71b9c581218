"""Shared-memory blocks for peers on one machine: the payload path of point-to-point messages.

Two processes of one job that run on the same machine can move a message's payload through memory both
map instead of through the backend's socket: the sender writes the payload into the block and sends only
the small header over c10d (which keeps the ordering, the deadline and the dead-peer detection of
:mod:`distlearn.comm.p2p`); the receiver reads the payload where it lies. On loopback TCP a 4 MB payload
costs two kernel copies each way plus the socket's flow control; through a shared block it costs one
``memcpy`` (or none, when the receiver computes on the block directly).

A block is a file in ``/dev/shm`` (tmpfs, i.e. memory) mapped with ``torch.from_file(shared=True)``. The
creator names it from a random token it sends in a header; the peer *attaches* only if the file exists on
its own machine with the expected size -- which is how a pair finds out that it shares a machine: on two
machines the file is simply not there, and both fall back to sending payloads over the backend -- and
then removes the name at once (``unlink``): the memory stays mapped by both and is freed by the kernel when
the last of them exits, however it exits, so a killed process leaks nothing once its peer has attached.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import torch

__all__ = ["SharedBlock", "new_token"]

DIRECTORY = Path("/dev/shm")


def new_token() -> int:
    """A random non-zero 48-bit token (exact in a float64 header field)."""
    return secrets.randbits(48) | 1


class SharedBlock:
    """``numel`` float32 numbers shared with a peer process on the same machine (see the module docstring).

    ``tensor`` is the block itself: writes are visible to the peer at once; the c10d message that follows
    a write orders it for the reader.
    """

    def __init__(self, path: Path, tensor: torch.Tensor) -> None:
        self.path = path
        self.tensor = tensor

    @staticmethod
    def name(token: int, role: str) -> Path:
        return DIRECTORY / f"distlearn-{token:012x}-{role}"

    @classmethod
    def create(cls, token: int, role: str, numel: int) -> SharedBlock | None:
        """A new zeroed block, or None where there is no ``/dev/shm`` or it is full (then use the socket)."""
        path = cls.name(token, role)
        if numel <= 0 or not DIRECTORY.is_dir():
            return None
        try:
            tensor = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
        except (OSError, RuntimeError):
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return cls(path, tensor)

    @classmethod
    def attach(cls, token: int, role: str, numel: int) -> SharedBlock | None:
        """The peer's block of ``numel`` numbers, unlinked once mapped; None if it is not on this machine."""
        path = cls.name(token, role)
        try:
            if path.stat().st_size != 4 * numel:
                return None
            tensor = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
        except (OSError, RuntimeError):
            return None
        block = cls(path, tensor)
        block.unlink()
        return block

    def unlink(self) -> None:
        """Remove the name (idempotent); the mapping stays valid in every process that has it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
