"""A real ``distlearn train --workers N`` job as a subprocess, its processes found in /proc, and cleaned up.

The job's processes are found by their parent pids (the command -> torchrun's agent -> the workers) and
each worker's ``RANK`` (read from /proc/PID/environ); :meth:`Job.close` kills, by pid, every process it
saw, so a failing test leaves none behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

if not Path("/proc/self/stat").is_file():
    pytest.skip("these tests read /proc (Linux)", allow_module_level=True)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and int(stat[1]) == pid and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return sorted(found)


def rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    rank = variables.get(b"RANK")
    return int(rank) if rank is not None else None


def train_command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "distlearn", "train", "--out", str(out), "--quiet", *flags]


class Job:
    """``distlearn train`` started as a subprocess; every process of it seen so far is remembered."""

    def __init__(self, command: list[str], log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 -- closed in close()
        self.cli = subprocess.Popen(command, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.seen: dict[int, str | None] = {}  # pid -> its start time (a reused pid is not ours)

    def agent(self) -> int | None:
        found = children(self.cli.pid)
        self._remember(found)
        return found[0] if found else None

    def workers(self) -> dict[int, int]:
        """{rank: pid} of the workers running now."""
        agent = self.agent()
        pids = children(agent) if agent is not None else []
        self._remember(pids)
        return {rank: pid for pid in pids if (rank := rank_of(pid)) is not None}

    def _remember(self, pids: list[int]) -> None:
        for pid in pids:
            stat = _stat(pid)
            self.seen.setdefault(pid, stat[19] if stat else None)

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.cli.poll() is not None:
                raise AssertionError(f"the job ended ({self.cli.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:g} s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text()

    def close(self) -> None:
        """Kill, by pid, whatever of the job still runs."""
        for pid, started in sorted(self.seen.items()):
            stat = _stat(pid)
            if alive(pid) and stat is not None and stat[19] == started:
                os.kill(pid, signal.SIGKILL)
        if self.cli.poll() is None:
            self.cli.kill()
        self.cli.wait()
        self._log_file.close()


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of ``pids`` runs; AssertionError naming those left after ``timeout``."""
    start = time.monotonic()
    while any(alive(pid) for pid in pids):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"still running after {timeout:g} s: {[p for p in pids if alive(p)]}")
        time.sleep(0.02)
    return time.monotonic() - start
