"""Process groups that the communication layer creates on the side, and their life cycle.

The reducers' full-duplex exchanges (:mod:`distlearn.comm.reducers`) send messages to lower ranks over a
*twin* of the caller's group: a second process group with the same ranks, its own sockets and I/O thread.
gloo serialises the send and the receive of one connection under one lock, so an exchange between two
ranks on one group is half duplex; on its twin, the other direction runs at the same time.

A twin is created collectively on the group's first duplex allreduce (every member makes that call at the
same point of its program) and cached for the process, shared by every reducer. Its life cycle is public:

* :func:`twin_group` ``(group, timeout_s)``: the twin of ``group``, created on first use;
* :func:`warm_group` ``(group, device)``: one allreduce of a single zero on ``group`` the first time a
  reducer runs batched rounds there (NCCL sets up the group's communicator on its first collective, and
  ``batch_isend_irecv`` as a group's first operation must involve every rank, which a round need not);
* :func:`release_groups`: forget every cached group. Call it before destroying the default process group
  (:func:`distlearn.launch.shutdown` does): a group still referenced from here at interpreter exit would
  be torn down during finalization, where gloo's threads can abort the process ("terminate called
  without an active exception").
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distlearn.errors import CommError

__all__ = ["release_groups", "twin_group", "wait_within", "warm_group"]

_TWINS: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
_WARM: dict[tuple[int, int, str], tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def twin_group(group: Any, timeout_s: float) -> Any:
    """A second process group with the ranks of ``group`` (None: the default group), created once
    (collectively, by every member at the same point of its program) and cached until
    :func:`release_groups`."""
    world = dist.group.WORLD
    key = (id(group), id(world))
    with _LOCK:
        entry = _TWINS.get(key)
        if entry is None:
            ranks = dist.get_process_group_ranks(world if group is None else group)
            twin = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), use_local_synchronization=True)
            entry = _TWINS[key] = (group, world, twin)  # holding group and world keeps their ids unique
    return entry[2]


def warm_group(group: Any, device: torch.device, timeout_s: float) -> None:
    """Run one collective on ``group`` (None: the default group) with a tensor on ``device``, waited for at
    most ``timeout_s``, once per process until :func:`release_groups` (collectively: every member at the
    same point of its program)."""
    world = dist.group.WORLD
    key = (id(group), id(world), str(device))
    with _LOCK:
        if key in _WARM:
            return
        work = dist.all_reduce(torch.zeros(1, device=device), group=group, async_op=True)
        work.wait(timedelta(seconds=timeout_s))
        _WARM[key] = (group, world)  # holding them keeps their ids unique


def wait_within(work: Any, timeout_s: float, *, rank: int, what: str) -> None:
    """Wait for a collective's ``work`` within ``timeout_s``, else a CommError naming ``rank``, ``what``."""
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except Exception as error:  # gloo raises RuntimeError on timeout or a closed connection
        raise CommError(
            f"rank {rank}: {what} did not complete within {timeout_s:.0f} s ({error}); "
            "a peer may have died or be stuck"
        ) from error


def release_groups() -> None:
    """Forget every cached twin group (and the groups they were keyed on) and which groups are warm; the
    next duplex allreduce creates its twin afresh. Call before ``torch.distributed.destroy_process_group``."""
    with _LOCK:
        _TWINS.clear()
        _WARM.clear()
