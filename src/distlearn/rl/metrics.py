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
from typing import Any

import numpy as np

from distlearn.metrics import MetricRecord, MetricsWriter

__all__ = ["SOLVED_WINDOW", "EpisodeStats", "RLMetrics"]

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
    ) -> None:
        self.writer = (
            MetricsWriter(run_dir, rank=rank, world_size=world_size, role=role, tensorboard="off")
            if run_dir is not None
            else None
        )
        self.algorithm, self.env_id, self.quiet = algorithm, env_id, quiet
        self.start = time.perf_counter()
        self._last = (self.start, 0, 0)
        self._staleness: list[float] = []

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
        elapsed = max(now - last_time, 1e-9)
        record = MetricRecord(
            kind=kind,  # type: ignore[arg-type]
            step=updates,
            epoch=0.0,
            wall_time=now - self.start,
            lr=lr,
            samples_per_s=(stats.env_steps - last_steps) / elapsed
            if kind != "summary"
            else stats.env_steps / max(now - self.start, 1e-9),
            staleness=float(np.mean(self._staleness)) if self._staleness else None,
            extra={
                "algorithm": self.algorithm,
                "env": self.env_id,
                "episode_return": stats.mean_return,
                "episodes": stats.episodes,
                "env_steps": stats.env_steps,
                "updates_per_s": (updates - last_updates) / elapsed
                if kind != "summary"
                else updates / max(now - self.start, 1e-9),
                "solved_env_steps": stats.solved_at[0] if stats.solved_at else None,
                "solved_seconds": stats.solved_at[1] if stats.solved_at else None,
                **extra,
            },
        )
        self._last = (now, stats.env_steps, updates)
        self._staleness = []
        if self.writer is not None:
            self.writer.write(record)
        if not self.quiet:
            mean = stats.mean_return
            print(
                f"[{self.algorithm}] {record.wall_time:7.1f}s updates {updates:6d} "
                f"env steps {stats.env_steps:8d} "
                f"return(100) {'-' if mean is None else f'{mean:7.1f}'} steps/s {record.samples_per_s:7.0f}"
                + (f" staleness {record.staleness:.2f}" if record.staleness is not None else ""),
                flush=True,
            )
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
