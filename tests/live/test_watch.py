"""The event streams' wake-up: watchfiles sees a run's files change; other changes, a timeout, a stop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from distlearn.errors import ConfigError
from distlearn.live.watch import ChangeWatch, watch_roots

pytestmark = pytest.mark.timeout(60)

LONG = 20.0  # a timeout no wait in these tests should reach unless the watch failed to wake


class Appender:
    """A thread appending a line to ``path`` every 0.1 s until stopped (a run writing records)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(0.1):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write("{}\n")

    def __enter__(self) -> Appender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)


def timed_wait(watch: ChangeWatch, paths: list[Path]) -> tuple[bool, float]:
    async def main() -> tuple[bool, float]:
        start = time.monotonic()
        try:
            changed = await watch.wait(paths)
        finally:
            await watch.aclose()
        return changed, time.monotonic() - start

    return asyncio.run(main())


def test_the_roots_are_the_run_directories_a_file_s_directory_and_a_missing_one_s_ancestor(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    missing = tmp_path / "not" / "yet" / "there"
    assert watch_roots([run, other / "metrics.jsonl", missing, run]) == [tmp_path, other, run]


def test_a_metrics_line_wakes_the_watch_long_before_its_timeout(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with Appender(run / "metrics.rank1.jsonl"):
        changed, took = timed_wait(ChangeWatch(latency=0.05, timeout=LONG), [run])
    assert changed and took < LONG / 2


def test_a_run_directory_that_appears_wakes_the_watch_on_its_parent(tmp_path):
    with Appender(tmp_path / "late" / "metrics.jsonl"):
        changed, took = timed_wait(ChangeWatch(latency=0.05, timeout=LONG), [tmp_path / "late"])
    assert changed and took < LONG / 2


def test_a_log_line_is_not_a_change_and_the_wait_ends_at_its_timeout(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("")
    with Appender(run / "train.log"):
        changed, took = timed_wait(ChangeWatch(latency=0.05, timeout=1.0), [run])
    assert not changed and 0.9 < took < LONG / 2


def test_the_stop_event_ends_a_wait_and_no_thread_is_left(tmp_path):
    before = set(threading.enumerate())
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    changed, took = timed_wait(ChangeWatch(latency=0.05, timeout=LONG, stop=stop), [tmp_path])
    assert not changed and took < LONG / 2
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()


def test_a_latency_or_timeout_that_is_not_positive_is_a_config_error():
    with pytest.raises(ConfigError, match="must be positive"):
        ChangeWatch(latency=0, timeout=1)
