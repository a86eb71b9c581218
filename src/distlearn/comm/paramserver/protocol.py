"""The parameter-server conversation on the fixed header of :mod:`distlearn.comm.p2p`: its flag bits."""

from __future__ import annotations

from enum import IntFlag

__all__ = ["ERROR_LAYOUT", "PushFlag", "ReplyFlag"]


class PushFlag(IntFlag):
    """Bits of the ``flag`` field of a PUSH (worker -> server)."""

    COMPRESSED = 1  # the payload is a codec's packed bytes (uint8), not float32 numbers
    SHARED = 2  # the payload lies in the worker's shared push block: only the header travels
    READ_ONLY = 4  # answer with the server's state, do not change it (EASGD's evaluation read)


class ReplyFlag(IntFlag):
    """Bits of the ``flag`` field of a PARAMS reply (server -> worker)."""

    DROPPED = 1  # the push was dropped as late (backup workers); the weights are the current ones
    VIA_SHARED = 2  # the weights lie in the worker's shared reply block (no payload follows)
    SHARED_ACCEPTED = 4  # the answer to an INIT: the server mapped the worker's shared blocks
    STOP = 8  # the server ends the job: this is the last reply (Gorila's "solved" or budget spent)


ERROR_LAYOUT = 1
"""``flag`` of an ERROR reply: the worker's parameter layout does not match the server's."""
