"""The shard plan: which server holds which parameter tensor."""

from __future__ import annotations

from distlearn.errors import ConfigError

__all__ = ["shard_numels", "shard_parameters"]


def shard_parameters(sizes: list[int], servers: int) -> list[list[int]]:
    """Split tensors of ``sizes`` elements over ``servers``: largest first, each to the least-loaded server.

    Greedy LPT scheduling (Graham, 1969): the heaviest load is at most 4/3 of the optimum. Ties go to the
    lower tensor index and the lower server. Returns each server's tensor indices in increasing order.
    """
    if servers < 1:
        raise ConfigError(f"need at least one server, got {servers}")
    loads = [0] * servers
    assigned: list[list[int]] = [[] for _ in range(servers)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(servers), key=lambda s: (loads[s], s))
        assigned[target].append(index)
        loads[target] += sizes[index]
    return [sorted(indices) for indices in assigned]


def shard_numels(sizes: list[int], plan: list[list[int]]) -> list[int]:
    """The number of elements each server of ``plan`` holds (the length of its flat shard)."""
    return [sum(sizes[i] for i in indices) for indices in plan]
