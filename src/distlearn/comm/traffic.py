"""How bytes are counted: every ``bytes_sent`` in distlearn is the bytes this rank puts on the wire.

One rule for every strategy, so that their byte columns compare (docs/benchmarks.md, "How bytes are
counted"):

* a point-to-point send (the ring, tree, Rabenseifner and segmented-ring reducers, the parameter server's
  and EASGD's transport, DNI's messages) counts the tensor it sends, and a transport message its header too;
* a collective of the backend, which does not report its traffic, counts what gloo's algorithm sends from
  this rank: an allreduce of ``n`` elements is a ring, ``2 (R - 1) / R`` of them
  (:func:`ring_allreduce_bytes`); an all-gather of ``b`` bytes is a ring too, ``(R - 1) b``
  (:func:`ring_allgather_bytes`).

So synchronous SGD, DDP, local SGD's averaging and synchronous EASGD's allreduce of the elastic differences
all count ``2 (R - 1) / R`` of the bytes they reduce; at ``R = 2`` that is the bytes themselves.
"""

from __future__ import annotations

__all__ = ["ring_allgather_bytes", "ring_allreduce_bytes"]


def ring_allreduce_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``numel`` elements of ``element_size`` bytes over
    ``world_size`` ranks: ``2 (R - 1)`` chunks of ``numel / R`` (rounded down to whole elements)."""
    if world_size <= 1:
        return 0
    return (2 * (world_size - 1) * numel // world_size) * element_size


def ring_allgather_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-gather of ``nbytes`` per rank: ``R - 1`` forwards of a payload."""
    return max(0, world_size - 1) * nbytes
