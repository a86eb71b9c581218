"""What the pool tests' processes run (importable by spawned processes; stdlib only, so they start fast)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def _note_pid(out: str | None, rank: int, pid: int | None = None, label: str = "pid") -> None:
    if out is not None:
        path = Path(out) / f"{label}{rank}"
        path.with_suffix(".tmp").write_text(str(pid or os.getpid()))
        path.with_suffix(".tmp").rename(path)  # never seen half written


def square_late(rank: int, processes: int) -> tuple[int, int]:
    """``(rank, rank**2)``, the higher ranks first (so arrival order is the reverse of rank order)."""
    time.sleep(0.3 * (processes - 1 - rank))
    return rank, rank * rank


def fail_on(rank: int, bad_rank: int, out: str) -> str:
    """Rank ``bad_rank`` raises; the others wait (to be stopped)."""
    _note_pid(out, rank)
    if rank == bad_rank:
        time.sleep(0.3)  # let the others start and note their pids
        raise ValueError(f"rank {rank} got a bad input on purpose")
    time.sleep(60)
    return "not stopped"


def hang(rank: int, out: str | None, with_grandchild: bool = False) -> None:
    """Never finishes; optionally starts a grandchild (``sleep``) that must be stopped with it."""
    if with_grandchild:
        child = subprocess.Popen(["sleep", "600"])
        _note_pid(out, rank, child.pid, label="grandchild")
    _note_pid(out, rank)
    time.sleep(600)


def exit_without_result(rank: int, code: int) -> str:
    """Rank 1 ends with ``os._exit(code)`` (no exception, no result); the others return after a moment."""
    if rank == 1:
        os._exit(code)
    time.sleep(0.5)
    return f"rank {rank} done"


def refuse(rank: int) -> None:
    """Raises a user's error (a DistlearnError): its message is all the parent reports, no traceback."""
    from distlearn.errors import DivergenceError

    raise DivergenceError(f"rank {rank}: training diverged at step 3 on purpose")
