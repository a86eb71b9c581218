"""A server's version count and its record of every update's staleness."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StalenessBook"]


class StalenessBook:
    """The version ``v`` of a server's state and what each push did to it.

    A push computed on version ``v_i`` that the server applies at version ``v`` has staleness
    ``tau = v - v_i``: the number of updates applied since the worker read the weights it used. Every
    update appends ``[v, worker, tau]`` (one row per gradient of the update) to :attr:`updates` and moves
    ``v`` to ``v + 1``; a push dropped as late (backup workers) is counted in :attr:`dropped` under the
    version it was computed on. ``keep_updates=False`` keeps only the counts (long runs with many updates).
    """

    def __init__(self, *, keep_updates: bool = True) -> None:
        self.version = 0
        self.pushes = 0
        self.updates: list[list[int]] = []  # [version before the update, worker rank, staleness]
        self.dropped: dict[int, int] = {}  # version the push was computed on -> pushes dropped
        self.applied_count = 0
        self.resumed_from: int | None = None
        self.keep_updates = keep_updates
        self._staleness_sum = 0
        self._staleness_max: int | None = None

    def staleness(self, used_version: int) -> int:
        """``tau = v - v_i`` of a push computed on ``used_version``."""
        return self.version - used_version

    def is_late(self, used_version: int) -> bool:
        """Whether an update happened since ``used_version`` (a backup-worker server drops such pushes)."""
        return used_version < self.version

    def received(self) -> None:
        """Count one push that arrived (applied, grouped or dropped)."""
        self.pushes += 1

    def drop(self, used_version: int) -> None:
        """Count a push computed on ``used_version`` that is not applied."""
        self.dropped[used_version] = self.dropped.get(used_version, 0) + 1

    def applied(self, entries: list[tuple[int, int]]) -> None:
        """Record one update made of the pushes ``(worker, staleness)`` and move to the next version."""
        for worker, staleness in entries:
            if self.keep_updates:
                self.updates.append([self.version, worker, staleness])
            self.applied_count += 1
            self._staleness_sum += staleness
            highest = self._staleness_max
            self._staleness_max = staleness if highest is None else max(highest, staleness)
        self.version += 1

    def summary(self) -> dict[str, Any]:
        """Counts and staleness statistics (the body of a server's report)."""
        count = self.applied_count
        return {
            "version": self.version,
            "resumed_from": self.resumed_from,
            "pushes": self.pushes,
            "applied": count,
            "dropped": sum(self.dropped.values()),
            "dropped_per_version": {str(v): c for v, c in sorted(self.dropped.items())},
            "updates": self.updates,
            "mean_staleness": self._staleness_sum / count if count else None,
            "max_staleness": self._staleness_max,
        }

    def state(self) -> dict[str, Any]:
        """Tensors and numbers for a checkpoint (``torch.load(weights_only=True)`` can read them)."""
        return {
            "version": self.version,
            "updates": torch.tensor(self.updates, dtype=torch.int64).reshape(-1, 3),
            "dropped": torch.tensor(sorted(self.dropped.items()), dtype=torch.int64).reshape(-1, 2),
            "pushes": self.pushes,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (the version count goes on from the saved one)."""
        self.version = int(state["version"])
        self.resumed_from = self.version
        self.updates = state["updates"].tolist()
        self.dropped = {int(v): int(c) for v, c in state["dropped"].tolist()}
        self.pushes = int(state["pushes"])
        self.applied_count = len(self.updates)
        self._staleness_sum = sum(u[2] for u in self.updates)
        self._staleness_max = max((u[2] for u in self.updates), default=None)
