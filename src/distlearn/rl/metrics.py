"""Progress of an RL run: finished episodes, the solved test, and the run's metric records.

* :class:`EpisodeStats`: returns of finished episodes and environment steps; the solved test is the mean
  return over the last :data:`SOLVED_WINDOW` episodes.
* :class:`RLMetrics`: the same JSON-lines records (:class:`~distlearn.metrics.MetricRecord`) as every
  distlearn run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distlearn.metrics import MetricRecord, MetricsWriter

__all__ = ["SOLVED_WINDOW", "EpisodeStats", "RLMetrics", "restore_stats", "stats_state"]

SOLVED_WINDOW = 100
"""Episodes averaged for the solved test (gymnasium's CartPole-v1: mean return >= 475 over 100 episodes)."""


class EpisodeStats:
    """Returns of finished episodes and environment steps; the solved test over the last 100 episodes."""

    def __init__(self, threshold: float | None = None, window: int = SOLVED_WINDOW) -> None:
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=window)
        self.episodes = 0
        self.env_steps = 0
        self.solved_at: tuple[int, float] | None = None  # (env steps, seconds) when first solved
        self.start = time.perf_counter()

    def add(self, returns: Sequence[float], steps: int = 0) -> None:
        self.env_steps += steps
        for value in returns:
            self.recent.append(float(value))
            self.episodes += 1
            if self.solved_at is None and self.solved:
                self.solved_at = (self.env_steps, time.perf_counter() - self.start)

    @property
    def mean_return(self) -> float | None:
        return float(np.mean(self.recent)) if self.recent else None

    @property
    def solved(self) -> bool:
        return (
            self.threshold is not None
            and len(self.recent) == self.recent.maxlen
            and float(np.mean(self.recent)) >= self.threshold
        )


def stats_state(stats: EpisodeStats) -> dict[str, Any]:
    """``stats`` as plain values (for a checkpoint)."""
    return {
        "recent": list(stats.recent),
        "episodes": stats.episodes,
        "env_steps": stats.env_steps,
        "solved_at": list(stats.solved_at) if stats.solved_at else None,
    }


def restore_stats(stats: EpisodeStats, state: dict[str, Any]) -> None:
    """Load :func:`stats_state`'s values back into ``stats`` (its window size stays)."""
    stats.recent.clear()
    stats.recent.extend(state["recent"])
    stats.episodes, stats.env_steps = state["episodes"], state["env_steps"]
    stats.solved_at = tuple(state["solved_at"]) if state["solved_at"] else None  # type: ignore[assignment]


class RLMetrics:
    """Writes RL progress as distlearn :class:`MetricRecord` s (one JSON-lines format for every run).

    ``step`` counts updates; ``samples_per_s`` is environment steps per second; ``extra`` carries
    ``episode_return`` (mean of the last 100 episodes), ``episodes``, ``env_steps``, ``updates_per_s`` and
    the solved time. ``staleness`` is the mean over the window where the algorithm has any.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        role: str = "learner",
        algorithm: str = "",
        env_id: str = "",
        quiet: bool = False,
        tensorboard: Literal["auto", "on", "off"] = "off",
        append: bool = False,
    ) -> None:
        self.writer = (
            MetricsWriter(
                run_dir,
                rank=rank,
                world_size=world_size,
                role=role,
                tensorboard=tensorboard,
                append=append,
                extra_scalars=("episode_return",),
            )
            if run_dir is not None
            else None
        )
        self.algorithm, self.env_id, self.quiet = algorithm, env_id, quiet
        self.start = time.perf_counter()
        self._last = (self.start, 0, 0)
        self._staleness: list[float] = []
        self._losses: list[float] = []
        self._first = (0, 0, 0.0)  # (env steps, updates, wall time) this run started from (resumed runs)

    def resumed(self, env_steps: int, updates: int, wall_time: float) -> None:
        """Continue from a checkpoint: the clock goes on, samples/s counts only this run's steps and time."""
        self._first = (env_steps, updates, wall_time)
        self._last = (self._last[0], env_steps, updates)

    def add_loss(self, value: float) -> None:
        """One update's loss; a train record's ``loss`` is the mean since the previous record."""
        self._losses.append(float(value))

    def add_staleness(self, value: float) -> None:
        self._staleness.append(float(value))

    def log(
        self,
        updates: int,
        stats: EpisodeStats,
        *,
        kind: str = "train",
        lr: float | None = None,
        **extra: Any,
    ) -> MetricRecord:
        now = time.perf_counter()
        last_time, last_steps, last_updates = self._last
        first_steps, first_updates, first_wall = self._first
        elapsed = max(now - last_time, 1e-9)
        this_run = max(now - self.start, 1e-9)
        record = MetricRecord(
            kind=kind,  # type: ignore[arg-type]
            step=updates,
            epoch=0.0,
            wall_time=first_wall + now - self.start,
            loss=float(np.mean(self._losses)) if self._losses else None,
            lr=lr,
            samples_per_s=(stats.env_steps - last_steps) / elapsed
            if kind != "summary"
            else (stats.env_steps - first_steps) / this_run,
            staleness=float(np.mean(self._staleness)) if self._staleness else None,
            extra={
                "algorithm": self.algorithm,
                "env": self.env_id,
                "episode_return": stats.mean_return,
                "episodes": stats.episodes,
                "env_steps": stats.env_steps,
                "updates_per_s": (updates - last_updates) / elapsed
                if kind != "summary"
                else (updates - first_updates) / this_run,
                "solved_env_steps": stats.solved_at[0] if stats.solved_at else None,
                "solved_seconds": stats.solved_at[1] if stats.solved_at else None,
                **extra,
            },
        )
        self._last = (now, stats.env_steps, updates)
        self._staleness = []
        if kind != "summary":
            self._losses = []
        if self.writer is not None:
            self.writer.write(record)
        if not self.quiet:
            mean = stats.mean_return
            print(
                f"[{self.algorithm}] {record.wall_time:7.1f}s updates {updates:6d} "
                f"env steps {stats.env_steps:8d} "
                f"return(100) {'-' if mean is None else f'{mean:7.1f}'} steps/s {record.samples_per_s:7.0f}"
                + (f" loss {record.loss:.4f}" if record.loss is not None else "")
                + (f" staleness {record.staleness:.2f}" if record.staleness is not None else ""),
                flush=True,
            )
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
