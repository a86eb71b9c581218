"""The hierarchical allreduce: shared memory within each host, an allreduce of one shard across hosts.

NCCL's scheme for a job of ``H`` hosts with ``L`` ranks each (Horovod's "hierarchical allreduce" uses one
leader per host instead; this one keeps every rank busy):

1. within each host, a reduce-scatter through shared memory (:class:`distlearn.comm.reducers.shm.ShmReducer`):
   local rank ``j`` ends up holding the host's sum of shard ``j`` (``chunk_bounds(n, L)[j]``, about ``n / L``
   elements);
2. across hosts, the ``H`` ranks with local index ``j`` (one per host: the *cross* group of ``j``) allreduce
   shard ``j`` with the ``inner`` reducer (``ring`` by default; ``tree``, ``rabenseifner``,
   ``segmented-ring`` or the ``backend``'s own), so that every host holds the job's sum of every shard;
3. within each host, an all-gather through shared memory gives every rank the whole vector.

Only ``n / L`` bytes per rank cross the network, and the ``L`` cross groups run at the same time (over the
host's network link, which they share). One host: the shared-memory allreduce alone. One rank per host: the
inner reducer alone, on the caller's group.

Hosts: found at a group's first call from torchrun's environment (``GROUP_RANK``, the node rank, with
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; the host name where torchrun's variables are missing) by one
all-gather over the group. The ranks need not be laid out node-major (torchrun's layout is): a host's ranks
are taken in rank order and local index ``j`` is a rank's position among them. Every host must have the same
number of ranks of the group (else a :class:`distlearn.errors.ConfigError` names the hosts and their counts),
and torchrun's ``LOCAL_WORLD_SIZE`` must agree with what the gather found. The intra-host group of each
host and the cross group of each local index are then created with ``dist.new_group(...,
use_local_synchronization=True)`` (each rank creates the two it belongs to, intra-host first; no rank waits
for another host's groups), once per group and cached. Any subgroup works the same way, with its ranks
renumbered.

Bytes: ``bytes_sent`` adds what the two shared-memory steps and the inner reducer count (each by the common
rule of :mod:`distlearn.comm.reducers`); :attr:`HierarchicalReducer.inter_host_bytes` counts the inner
reducer's part alone, the bytes that cross the network.

Failures: a timeout or a dead peer in any step is a :class:`distlearn.errors.CommError` that starts
``hierarchical allreduce: rank R`` (R: the rank in the caller's group) and names the step, then the step's own
message (which names the rank that did not arrive).
"""

from __future__ import annotations

import os
import socket
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distlearn.comm.reducers.base import (
    DEFAULT_TAG,
    DEFAULT_TIMEOUT_S,
    BackendReducer,
    Reducer,
    _backend_message,
)
from distlearn.comm.reducers.ring import RingReducer, SegmentedRingReducer
from distlearn.comm.reducers.shm import ShmReducer
from distlearn.comm.reducers.tree import RabenseifnerReducer, TreeReducer
from distlearn.errors import CommError, ConfigError

__all__ = ["INNER_REDUCERS", "HierarchicalReducer", "Topology", "host_layout"]

INNER_REDUCERS: dict[str, type[Reducer]] = {
    "ring": RingReducer,
    "tree": TreeReducer,
    "rabenseifner": RabenseifnerReducer,
    "segmented-ring": SegmentedRingReducer,
    "backend": BackendReducer,
}
"""The reducers that can run the cross-host step (``inner``)."""


@dataclass(frozen=True)
class Topology:
    """The hosts of one group: ``hosts[h]`` the group ranks on host ``h`` (in rank order), this rank's host
    ``host`` and local index ``local``, and the process groups of its two steps (``intra``: its host's ranks,
    ``cross``: the ranks with its local index, one per host; either may be the caller's group itself)."""

    hosts: tuple[tuple[int, ...], ...]
    host: int
    local: int
    intra: Any
    cross: Any

    @property
    def local_size(self) -> int:
        return len(self.hosts[0])


def _node_key() -> tuple[int, int, int]:
    """(node id, LOCAL_RANK or -1, LOCAL_WORLD_SIZE or -1) of this process, as integers for a tensor gather.

    The node id is torchrun's ``GROUP_RANK`` (the node rank); without it, a 62-bit hash of the host name
    (tagged so that it cannot equal a node rank)."""
    node = os.environ.get("GROUP_RANK")
    if node is not None and node.strip().lstrip("-").isdigit():
        node_id = int(node)
    else:
        node_id = (1 << 62) | zlib.crc32(socket.gethostname().encode())
    local_rank = int(os.environ.get("LOCAL_RANK", "-1") or -1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "-1") or -1)
    return node_id, local_rank, local_world


def host_layout(keys: list[tuple[int, int, int]]) -> tuple[tuple[int, ...], ...]:
    """The hosts of a group from every rank's :func:`_node_key` (index: rank in the group): a tuple per host
    (in the order of their lowest rank) of its ranks in rank order. Raises :class:`ConfigError` when the hosts
    have different numbers of ranks or torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE disagree with the gather."""
    by_node: dict[int, list[int]] = {}
    for rank, (node, _, _) in enumerate(keys):
        by_node.setdefault(node, []).append(rank)
    hosts = tuple(tuple(ranks) for ranks in by_node.values())

    def node_name(node: int) -> str:
        return f"host {node & 0xFFFFFFFF:#x} (by name)" if node >> 62 else f"node {node}"

    sizes = {len(ranks) for ranks in hosts}
    if len(sizes) > 1:
        counts = ", ".join(f"{node_name(node)}: {len(ranks)}" for node, ranks in by_node.items())
        raise ConfigError(
            f"hierarchical allreduce: the hosts have different numbers of ranks ({counts}); start every node "
            "with the same --nproc-per-node, or choose a flat reducer (--reducer ring or backend)"
        )
    for node, ranks in by_node.items():
        locals_ = [keys[rank][1] for rank in ranks]
        if -1 not in locals_ and len(set(locals_)) != len(locals_):
            raise ConfigError(
                f"hierarchical allreduce: {node_name(node)} has ranks {ranks} with repeated LOCAL_RANK "
                f"{sorted(locals_)}; two nodes were started with the same --node-rank: give each its own"
            )
    return hosts


class HierarchicalReducer(Reducer):
    """Shared-memory reduce-scatter within each host, ``inner`` allreduce of each shard across hosts,
    shared-memory all-gather within each host (see the module docstring).

    Args:
        inner: the cross-host reducer: ``ring`` (default), ``tree``, ``rabenseifner``, ``segmented-ring`` or
            ``backend``.
        timeout_s, tag, duplex, batched: as every reducer; ``tag``, ``duplex`` and ``batched`` go to the inner
            reducer, ``timeout_s`` to every step (and to the setup's gather and group creation).

    Attributes:
        inter_host_bytes: the part of ``bytes_sent`` that the inner reducer sent across hosts.
    """

    name: ClassVar[str] = "hierarchical"
    point_to_point: ClassVar[bool] = False  # its steps are the sub-reducers' (no duplex twin of its own)

    def __init__(
        self,
        *,
        inner: str = "ring",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tag: int = DEFAULT_TAG,
        duplex: bool = True,
        batched: bool | None = None,
    ) -> None:
        super().__init__(timeout_s=timeout_s, tag=tag, duplex=duplex, batched=batched)
        if inner not in INNER_REDUCERS:
            raise ConfigError(
                f"hierarchical: unknown inner reducer {inner!r}; choose one of: {', '.join(INNER_REDUCERS)}"
            )
        self.inner_name = inner
        if inner == "backend":
            self.inner: Reducer = BackendReducer(timeout_s=timeout_s)
        else:
            self.inner = INNER_REDUCERS[inner](timeout_s=timeout_s, tag=tag, duplex=duplex, batched=batched)
        self.shm = ShmReducer(timeout_s=timeout_s)
        self.inter_host_bytes = 0
        self._topologies: dict[tuple[int, int], tuple[Any, Any, Topology]] = {}

    def __repr__(self) -> str:
        return f"HierarchicalReducer(inner={self.inner_name!r}, timeout_s={self.timeout_s:g})"

    def topology(self, group: Any = None, timeout_s: float | None = None) -> Topology:
        """The hosts of ``group`` and this rank's two groups: found and created on the group's first call
        (collectively: every member of ``group`` at the same point of its program), then cached."""
        world = dist.group.WORLD
        key = (id(group), id(world))
        entry = self._topologies.get(key)
        if entry is None:
            topology = self._discover(group, self.timeout_s if timeout_s is None else timeout_s)
            entry = self._topologies[key] = (group, world, topology)  # holding them keeps the ids unique
        return entry[2]

    def close(self) -> None:
        super().close()
        self.inner.close()
        self.shm.close()

    # ---- internals --------------------------------------------------------------------------------------

    def _discover(self, group: Any, timeout_s: float) -> Topology:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        mine = torch.tensor(_node_key(), dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(size)]
        try:
            work = dist.all_gather(gathered, mine, group=group, async_op=True)
            work.wait(timedelta(seconds=timeout_s))
        except Exception as error:
            raise CommError(
                f"hierarchical allreduce: rank {rank} could not gather the ranks' hosts within "
                f"{timeout_s:g} s ({type(error).__name__}: {_backend_message(error)}); a peer may have died"
            ) from error
        keys = [tuple(int(v) for v in t.tolist()) for t in gathered]
        hosts = host_layout(keys)  # type: ignore[arg-type]
        host = next(h for h, ranks in enumerate(hosts) if rank in ranks)
        local = hosts[host].index(rank)
        if group is None or group is dist.group.WORLD:  # torchrun's count covers the whole node's ranks
            for ranks in hosts if len(hosts) > 1 else ():
                declared = {keys[r][2] for r in ranks} - {-1}
                if declared and declared != {len(ranks)}:
                    raise ConfigError(
                        f"hierarchical allreduce: ranks {list(ranks)} share a node but their "
                        f"LOCAL_WORLD_SIZE is {sorted(declared)}, not {len(ranks)}; two nodes may have been "
                        "given the same --node-rank"
                    )
        group_ranks = dist.get_process_group_ranks(dist.group.WORLD if group is None else group)
        intra, cross = group, group
        try:
            if len(hosts) > 1 and len(hosts[host]) > 1:
                timeout = timedelta(seconds=timeout_s)
                intra = dist.new_group(
                    [group_ranks[r] for r in hosts[host]], timeout=timeout, use_local_synchronization=True
                )
                cross = dist.new_group(
                    [group_ranks[ranks[local]] for ranks in hosts],
                    timeout=timeout,
                    use_local_synchronization=True,
                )
        except Exception as error:
            raise CommError(
                f"hierarchical allreduce: rank {rank} could not create its intra-host and cross-host groups "
                f"within {timeout_s:g} s ({type(error).__name__}: {_backend_message(error)}); a peer may "
                "have died"
            ) from error
        return Topology(hosts=hosts, host=host, local=local, intra=intra, cross=cross)

    def _prepare(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> None:
        """The collective steps before a call (the asynchronous path runs them in the caller's thread): the
        topology, then the sub-reducers' own preparation on their groups."""
        if not dist.is_initialized() or dist.get_world_size(group) < 2:
            return
        topology = self.topology(group, timeout_s)
        hosts, local_size = len(topology.hosts), topology.local_size
        if local_size > 1:
            self._step(
                "preparing the shared memory",
                topology,
                lambda: self.shm._prepare(tensor, topology.intra, timeout_s),
            )
        if hosts > 1:
            self._step(
                "preparing the cross-host group",
                topology,
                lambda: self.inner._prepare(tensor, topology.cross, timeout_s),
            )

    def _step(self, what: str, topology: Topology, action: Any, members: tuple[int, ...] = ()) -> Any:
        """Run one step; a CommError from it is prefixed with this rank and ``what``, and, where the step ran
        on a subgroup of ``members`` (ranks of the caller's group), with how the step's ranks map to them."""
        try:
            return action()
        except CommError as error:
            rank = topology.hosts[topology.host][topology.local]
            where = ""
            if members:
                numbers = ", ".join(str(i) for i in range(len(members)))
                where = f" (its ranks {numbers} are ranks {', '.join(map(str, members))} here)"
            raise CommError(f"hierarchical allreduce: rank {rank} {what}{where}: {error}") from error

    def _run(self, tensor: torch.Tensor, group: Any, timeout_s: float | None) -> torch.Tensor:
        self._check_call(timeout_s)
        if dist.get_world_size(group) < 2 or tensor.numel() == 0:
            return tensor
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        topology = self.topology(group, timeout)
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        flat = work.view(-1)
        hosts, local_size = len(topology.hosts), topology.local_size
        shm_before, inner_before = self.shm.bytes_sent, self.inner.bytes_sent
        try:
            if hosts == 1:
                self._step(
                    "in the shared-memory allreduce",
                    topology,
                    lambda: self.shm.allreduce_(flat, topology.intra, timeout_s=timeout),
                )
            elif local_size == 1:
                self._step(
                    f"in the cross-host {self.inner_name} allreduce",
                    topology,
                    lambda: self.inner.allreduce_(flat, topology.cross, timeout_s=timeout),
                )
            else:
                host = topology.hosts[topology.host]
                across = tuple(ranks[topology.local] for ranks in topology.hosts)
                start, stop = self._step(
                    "in the intra-host reduce-scatter",
                    topology,
                    lambda: self.shm.reduce_scatter_(flat, topology.intra, timeout_s=timeout),
                    host,
                )
                shard = flat[start:stop]
                self._step(
                    f"in the cross-host {self.inner_name} allreduce of shard {topology.local}",
                    topology,
                    lambda: self.inner.allreduce_(shard, topology.cross, timeout_s=timeout),
                    across,
                )
                self._step(
                    "in the intra-host all-gather",
                    topology,
                    lambda: self.shm.all_gather_(flat, topology.intra, timeout_s=timeout),
                    host,
                )
        finally:
            inter = self.inner.bytes_sent - inner_before
            self.inter_host_bytes += inter
            self.bytes_sent += inter + self.shm.bytes_sent - shm_before
        if work is not tensor:
            tensor.copy_(work)
        return tensor
