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

On NCCL (batched rounds): NCCL wants the sends and receives of one exchange issued together
(``torch.distributed.batch_isend_irecv``, a ``ncclGroupStart/End``); point-to-point operations posted one by
one between the same pair of ranks can serialise on one stream and deadlock, and posting a receive ahead for
a later step (as the paths above do) inside a batch deadlocks too. So every algorithm also exists as a list of
*rounds* (:class:`Message` lists, built by ``_rounds``): a round holds every send and receive of one step, is
posted as one batch on ``group`` (no duplex twin), waited with the deadline, and only then are its received
pieces added and the next round posted. A message and its match at the peer are in the same round, so round
t of every rank completes once every rank has posted round t: no deadlock. The ring and the tree keep their
pipelining as a wavefront (segment k of step s travels in round s + k); Rabenseifner's steps are one round
each. Each sum is taken in the same order as on the unbatched path, so both give the same bits, and send the
same bytes (``bytes_sent``). Batched rounds are used when the tensor is on a CUDA device and the group's
backend is NCCL (``batched=None``, the default), or always with ``batched=True`` (that is how the tests run
them on gloo); before a group's first batched call every rank runs one tiny allreduce on it
(:func:`distlearn.comm.groups.warm_group`), because NCCL requires a group's first batched point-to-point to
involve every rank. The asynchronous worker runs a CUDA call on the tensor's device and on a stream ordered
after the caller's (:mod:`distlearn.comm.reducers.worker`).

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

import inspect
from collections.abc import Callable
from typing import Any

from distlearn.comm.groups import release_groups
from distlearn.comm.reducers.base import (
    DEFAULT_TAG,
    DEFAULT_TIMEOUT_S,
    BackendReducer,
    Channel,
    Message,
    Reducer,
    Rounds,
    chunk_bounds,
)
from distlearn.comm.reducers.hierarchical import HierarchicalReducer
from distlearn.comm.reducers.ring import RingReducer, SegmentedRingReducer
from distlearn.comm.reducers.shm import ShmReducer
from distlearn.comm.reducers.tree import RabenseifnerReducer, TreeReducer
from distlearn.errors import ConfigError

__all__ = [
    "DEFAULT_TAG",
    "DEFAULT_TIMEOUT_S",
    "BackendReducer",
    "Channel",
    "HierarchicalReducer",
    "Message",
    "RabenseifnerReducer",
    "REDUCERS",
    "Reducer",
    "RingReducer",
    "Rounds",
    "SegmentedRingReducer",
    "ShmReducer",
    "TreeReducer",
    "chunk_bounds",
    "create_reducer",
    "release_twin_groups",
]


def release_twin_groups() -> None:
    """Forget the reducers' cached duplex twin groups: :func:`distlearn.comm.groups.release_groups`."""
    release_groups()


REDUCERS: dict[str, type[Reducer]] = {
    "backend": BackendReducer,
    "ring": RingReducer,
    "tree": TreeReducer,
    "rabenseifner": RabenseifnerReducer,
    "segmented-ring": SegmentedRingReducer,
    "shm": ShmReducer,
    "hierarchical": HierarchicalReducer,
}
"""Every allreduce algorithm by name, for ``--reducer`` and :func:`create_reducer`."""


def create_reducer(name: str, **options: Any) -> Reducer:
    """The reducer called ``name`` (a key of :data:`REDUCERS`) built with ``options``.

    Options: ``timeout_s``, ``tag``, ``duplex`` and ``batched`` for every reducer, ``segment_bytes`` for
    ``segmented-ring`` and ``tree``, ``inner`` (the cross-host reducer) for ``hierarchical``.
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
