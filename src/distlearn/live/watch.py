"""Wake the event streams when a run's files change, with watchfiles (inotify on Linux), not a sleep loop.

:class:`ChangeWatch` waits, for one event stream, until a metrics file, a parameter server's report or a
directory entry changes in the directories of the runs it follows, or until ``timeout`` seconds pass (the
stream then still reads the files, finds new runs, sends the demo's process states and a keep-alive, so a
file system without change notifications, a network mount written from another machine, is read once a
``timeout``; ``WATCHFILES_FORCE_POLLING=1`` makes watchfiles itself poll). Changes that arrive together are
gathered for up to ``latency`` seconds and read at once.

What is watched, never recursively: a run directory itself; for a metrics file, its directory; for a run
directory that does not exist yet, its nearest existing ancestor (its appearance is a change there, and the
watch moves down as the path appears); for ``distlearn live`` without run directories, the root it
searches. The watcher's thread ends within ``timeout`` of :meth:`ChangeWatch.aclose` or of ``stop``.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import Any

from distlearn.errors import ConfigError
from distlearn.metrics import METRICS_FILE

__all__ = ["ChangeWatch", "watch_roots"]

_WATCHED_NAME = re.compile(r"^(metrics\.rank\d+\.jsonl|ps-server\d+\.json)$")


def watch_roots(paths: Iterable[Path]) -> list[Path]:
    """The existing directories to watch for ``paths`` (run directories, metrics files, missing ones)."""
    roots: set[Path] = set()
    for path in paths:
        path = Path(path).absolute()
        if path.is_file():
            path = path.parent
        while not path.is_dir() and path != path.parent:
            path = path.parent
        roots.add(path)
    return sorted(roots)


def _relevant(change: Any, path: str) -> bool:
    """A change that can give the streams something new: a metrics file or server report, or an entry
    that appeared or went away (a run directory, a rewritten file). A train.log line is not one."""
    import watchfiles

    name = Path(path).name
    return name == METRICS_FILE or bool(_WATCHED_NAME.match(name)) or change != watchfiles.Change.modified


class _Stop:
    """The stop flag watchfiles checks every step: set by :meth:`ChangeWatch.aclose` or by ``outer``."""

    def __init__(self, outer: threading.Event | None) -> None:
        self.outer = outer
        self.own = threading.Event()

    def is_set(self) -> bool:
        return self.own.is_set() or (self.outer is not None and self.outer.is_set())

    def set(self) -> None:  # watchfiles sets it when the waiting task is cancelled
        self.own.set()


class ChangeWatch:
    """Waits until the files of some runs change (True) or ``timeout`` seconds pass (False).

    Args:
        latency: seconds over which changes are gathered once one arrived (the page lags a write by at
            most about this).
        timeout: the longest one :meth:`wait` blocks without a relevant change (up to twice this while
            other files of the directories change).
        stop: when set, a waiting :meth:`wait` returns False within 50 ms (the server's stopping event).

    Use it from one task: ``await watch.wait(paths)`` for each round, ``await watch.aclose()`` at the end.
    """

    def __init__(self, *, latency: float, timeout: float = 1.0, stop: threading.Event | None = None) -> None:
        if latency <= 0 or timeout <= 0:
            raise ConfigError(
                f"the watch latency and timeout must be positive, got {latency} and {timeout}; try 0.25 and 1"
            )
        self.latency_ms = max(1, round(1000 * latency))
        self.timeout_ms = max(1, round(1000 * timeout))
        self.stop = stop
        self.roots: list[Path] = []
        self._changes: AsyncGenerator[set[Any], None] | None = None
        self._stop: _Stop | None = None

    async def wait(self, paths: Iterable[Path]) -> bool:
        """Block until a relevant change under ``paths`` (True), or ``timeout`` or ``stop`` (False)."""
        roots = watch_roots(paths)
        if roots != self.roots or self._changes is None:
            await self.aclose()
            self._start(roots)
        assert self._changes is not None
        # The filter is applied here, not by watchfiles: its own filter waits on through changes it drops,
        # so a train.log written every second would keep it from ever reaching its timeout.
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            try:
                changes = await anext(self._changes)
            except StopAsyncIteration:  # stopped (or a watched directory went away): start afresh next time
                self._changes = None
                return False
            except FileNotFoundError:  # a root vanished between finding it and watching it
                self._changes = None
                return True
            if not changes:  # the timeout, with no change at all
                return False
            if any(_relevant(change, path) for change, path in changes):
                return True
            if time.monotonic() >= deadline:
                return False

    def _start(self, roots: list[Path]) -> None:
        import watchfiles

        self.roots = roots
        self._stop = _Stop(self.stop)
        self._changes = watchfiles.awatch(
            *roots,
            watch_filter=None,
            debounce=self.latency_ms,
            step=min(50, self.latency_ms),
            stop_event=self._stop,  # type: ignore[arg-type]  # watchfiles only calls is_set() and set()
            rust_timeout=self.timeout_ms,
            yield_on_timeout=True,
            recursive=False,
            ignore_permission_denied=True,
        )

    async def aclose(self) -> None:
        """Stop watching (the watcher's thread ends within ``timeout``); :meth:`wait` starts it again."""
        if self._stop is not None:
            self._stop.set()
        changes, self._changes = self._changes, None
        if changes is not None:
            with contextlib.suppress(RuntimeError):  # closing a generator that is mid-step elsewhere
                await changes.aclose()
