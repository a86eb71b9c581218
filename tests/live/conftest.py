"""Fixtures of the live-dashboard tests: real metrics writers, a run that trains in a thread, Chromium."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from live_helpers import train_record  # noqa: E402

from distlearn.metrics import MetricRecord, MetricsWriter  # noqa: E402


@pytest.fixture
def writer_factory(tmp_path: Path) -> Iterator[Callable[..., MetricsWriter]]:
    """Real MetricsWriters (closed at the end of the test)."""
    writers: list[MetricsWriter] = []

    def make(run_dir: Path, **kwargs: Any) -> MetricsWriter:
        kwargs.setdefault("tensorboard", "off")
        writer = MetricsWriter(run_dir, **kwargs)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close()


class WritingRun:
    """A two-rank run whose records a thread appends, one step of 5 every ``interval`` seconds.

    Rank 0 logs training and (every 25 steps) evaluation records, rank 1 training records with bytes sent
    and a staleness, as a ``distlearn train`` job does while it runs. :meth:`stop` ends the thread.
    """

    def __init__(self, run_dir: Path, interval: float = 0.15, steps: int = 2000) -> None:
        self.run_dir = run_dir
        self.interval = interval
        self.steps = steps
        self.written = 0
        self._stop = threading.Event()
        self._writers = [
            MetricsWriter(run_dir, rank=rank, world_size=2, tensorboard="off", run=run_dir.name)
            for rank in (0, 1)
        ]
        self._thread = threading.Thread(target=self._write, name="writing-run", daemon=True)

    def _write(self) -> None:
        for step in range(5, self.steps + 1, 5):
            if self._stop.wait(self.interval):
                return
            self._writers[0].write(train_record(step))
            self._writers[1].write(train_record(step, staleness=float(step % 3)))
            if step % 25 == 0:
                self._writers[0].write(
                    MetricRecord(kind="eval", step=step, epoch=step / 100, wall_time=0.1 * step,
                                 loss=1.5 / (1 + step), accuracy=min(1.0, 0.2 + step / 100))
                )  # fmt: skip
            self.written = step

    def start(self) -> WritingRun:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for writer in self._writers:
            writer.close()


@pytest.fixture
def writing_run(tmp_path: Path) -> Iterator[WritingRun]:
    """A run in ``tmp_path/growing`` that keeps writing records until the test ends."""
    run = WritingRun(tmp_path / "growing").start()
    try:
        yield run
    finally:
        run.stop()


def find_chromium() -> str | None:
    """Debian's chromium (``make test`` installs it as root), or ``DISTLEARN_CHROMIUM``."""
    explicit = os.environ.get("DISTLEARN_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "no Chromium on this machine: `make install` installs Debian's chromium where it runs as root "
            "with apt-get; elsewhere install it (apt-get install chromium) or set DISTLEARN_CHROMIUM"
        )
    return path


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``$DISTLEARN_TEST_ARTIFACTS`` if set, else the test's tmp dir."""
    directory = Path(os.environ.get("DISTLEARN_TEST_ARTIFACTS") or tmp_path / "artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory
