"""A job's processes die with their launcher, whatever kills it.

``distlearn train --workers N`` is three generations of processes: the command (the launcher), torchrun's
agent (its child, in a session of its own so one signal reaches it), and the workers (the agent's children;
torchrun puts each in a session of its own, so a signal to the agent's group does not reach them). When a
process dies by SIGKILL nobody gets to clean up, so each generation is tied to the one above it instead:

- the agent gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set between ``fork`` and
  ``exec`` by :func:`dies_with_this_process`): when the launcher dies, the kernel kills the agent;
- each worker sets the same on itself as the first thing it does (:func:`tie_to_agent`, called by
  ``python -m distlearn`` and by :func:`distlearn.launch.init_distributed`): when the agent dies, the kernel
  kills the worker. A worker whose agent died before it could set the signal sees that its parent is no
  longer the launcher's child, and exits at once;
- each worker records its pid in a folder the launcher names (:data:`ENV_PID_DIR`), so that a launcher whose
  agent died (``kill -9`` of the agent) can check that every worker is gone and kill any that is not
  (:func:`stop_recorded`) before it reports the agent's death.

The parent-death signal fires when the *thread* that started the process ends; torchrun starts its workers
from its main thread, and :func:`distlearn.launch.launch_local` waits in the thread that started the agent,
so in both cases the thread lives as long as the process. Other systems than Linux have no parent-death
signal: there a worker runs a watchdog thread instead that polls its parent's pid once a second and exits
when it changes (the parent died and the worker was handed to init), so there a worker outlives its agent by
at most about a second, and the agent outlives a killed launcher until its workers have gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "ENV_LAUNCHER_PID",
    "ENV_PID_DIR",
    "dies_with_this_process",
    "new_pid_dir",
    "parent_death_signal",
    "recorded_workers",
    "stop_recorded",
    "tie_to_agent",
]

ENV_LAUNCHER_PID = "DISTLEARN_LAUNCHER_PID"
"""The pid of the process that started torchrun's agent (set by :func:`distlearn.launch.launch_local`)."""

ENV_PID_DIR = "DISTLEARN_PID_DIR"
"""A folder where every worker of the job writes a file named after its pid (set by ``launch_local``)."""

_ENV_WORKER = "DISTLEARN_WORKER_PID"
_PID_DIR_PREFIX = "distlearn-job-"
_PR_SET_PDEATHSIG = 1
_WATCH_EVERY_S = 1.0
_tied = False


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies; False where unsupported."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child is killed (SIGKILL) when this process dies.

    Runs in the child between ``fork`` and ``exec``; if this process died before the signal was set, the
    child exits at once. None where the system has no parent-death signal.
    """
    prctl = _prctl()  # looked up here, not in the child
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the signal was set
            os._exit(1)

    return preexec


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with its pid, it names one process), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def tie_to_agent() -> None:
    """In a worker that torchrun's agent started: die when the agent dies. Idempotent; elsewhere a no-op.

    Sets the parent-death signal (or, without one, starts the watchdog thread), checks that the agent has not
    died already, and records this worker's pid in :data:`ENV_PID_DIR` when the launcher named one.
    """
    global _tied
    if _tied or "TORCHELASTIC_RUN_ID" not in os.environ:  # not a worker of a torchrun agent
        return
    if os.environ.get(_ENV_WORKER, str(os.getpid())) != str(os.getpid()):
        return  # a process that a worker started (it inherited the worker's environment), not a worker
    _tied = True
    os.environ[_ENV_WORKER] = str(os.getpid())
    agent = os.getppid()
    if parent_death_signal(signal.SIGKILL):
        launcher = os.environ.get(ENV_LAUNCHER_PID)
        # The agent may have died between our start and the prctl: then our parent is init or a subreaper.
        gone = agent == 1 or (launcher is not None and _parent_of(agent) not in (None, int(launcher)))
        if gone:
            print("distlearn: the torchrun agent that started this worker is gone; exiting", file=sys.stderr)
            os._exit(1)
    else:
        threading.Thread(target=_watch_parent, args=(agent,), name="distlearn-lifeline", daemon=True).start()
    pid_dir = os.environ.get(ENV_PID_DIR)
    if pid_dir:
        with contextlib.suppress(OSError):  # a launcher that already cleaned up: nothing to record
            (Path(pid_dir) / str(os.getpid())).write_text(_start_time(os.getpid()) or "")


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_EVERY_S)
    os._exit(1)


def new_pid_dir() -> str:
    """A new folder for :data:`ENV_PID_DIR`; those left by launchers that were killed are removed first."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob(f"{_PID_DIR_PREFIX}*"):
        launcher = stale.name.removeprefix(_PID_DIR_PREFIX).split("-", 1)[0]
        if launcher.isdigit() and not _exists(int(launcher)) and not recorded_workers(stale):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_PID_DIR_PREFIX}{os.getpid()}-")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded_workers(pid_dir: str | Path) -> list[int]:
    """The pids recorded in ``pid_dir`` whose process is still the one that recorded it and not a zombie."""
    alive = []
    for path in Path(pid_dir).iterdir() if Path(pid_dir).is_dir() else []:
        if not path.name.isdigit():
            continue
        pid = int(path.name)
        with contextlib.suppress(OSError):
            recorded = path.read_text().strip()
            if recorded and _start_time(pid) == recorded and not _zombie(pid):
                alive.append(pid)
    return sorted(alive)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def stop_recorded(pid_dir: str | Path, grace_s: float = 3.0) -> list[int]:
    """Make sure every worker recorded in ``pid_dir`` is gone: wait up to ``grace_s``, then SIGKILL.

    Returns the pids that had to be killed. Without ``/proc`` (not Linux) it cannot check and returns [].
    """
    deadline = time.monotonic() + grace_s
    while (left := recorded_workers(pid_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while recorded_workers(pid_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
