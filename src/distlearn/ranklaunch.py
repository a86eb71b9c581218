"""Start a job's ranks on this machine as plain processes, with a failure policy that is the strategy's own.

torchrun's agent stops every process of the job as soon as one of them fails. That is right for synchronous
training (nobody can go on without the others) and wrong for a strategy built to survive a lost worker: the
parameter server keeps serving the others when one worker dies. Such a strategy (``launcher = "ranks"``)
is started by :func:`launch_ranks`, which does what torchrun does for one machine -- one process per rank,
with the rendezvous in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), a free port on 127.0.0.1 -- and then applies the
strategy's :class:`RankPolicy`:

* a rank of ``essential`` (a server) that fails ends the job: the others get ``grace_s`` seconds to end by
  themselves (they notice the closed connection and say so), then they are stopped;
* any other rank that fails is reported (``warning: worker rank 2 died (SIGKILL) 14.2 s into the job``)
  and the others go on;
* the job's exit status is 0 when every rank of ``required`` (the servers and the main worker) ended with
  0 -- with a last warning line naming every lost rank and when -- and 1 otherwise, with one line saying
  which rank failed.

No process outlives the launcher: the ranks share one new process group (so one signal reaches all of them,
and a Ctrl-C in the terminal reaches only the launcher, which stops them in order); a deadline
(``timeout_s``), Ctrl-C, SIGTERM or SIGHUP stop the whole group (SIGTERM, then SIGKILL after 5 s); and each
rank gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so a launcher
killed with ``kill -9`` takes its ranks with it.

On several machines the user starts the ranks (``torchrun`` on each machine, or plain processes with the
same environment); torchrun's policy then applies per machine: a failing worker stops the processes torchrun
started on its machine. Run one process per machine (``--nproc-per-node 1``) or start plain processes to keep
the parameter server's tolerance there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from distlearn.errors import CommError, ConfigError
from distlearn.launch import ENV_LAUNCHED, Terminated, free_port, stop_signals_raise
from distlearn.lifeline import dies_with_this_process

__all__ = ["RankPolicy", "launch_ranks"]


@dataclass(frozen=True)
class RankPolicy:
    """What the failure of each rank means for the job (see the module docstring).

    Args:
        essential: ranks whose failure ends the job (a parameter server: nobody can go on without it).
        required: ranks that must end with status 0 for the job to succeed (the servers, and the worker that
            writes the metrics, evaluations and checkpoints).
        roles: a name per rank for the messages (``"server"``, ``"worker"``; default none: ``rank 2``).
        after_loss: a sentence added to the warning about lost ranks (where the details are).
    """

    essential: frozenset[int] = frozenset()
    required: frozenset[int] = frozenset()
    roles: dict[int, str] = field(default_factory=dict)
    after_loss: str = ""

    def name(self, rank: int) -> str:
        role = self.roles.get(rank)
        return f"{role} rank {rank}" if role else f"rank {rank}"


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _say(line: str) -> None:
    print(f"distlearn train: {line}", file=sys.stderr, flush=True)


def launch_ranks(
    program: list[str],
    nproc: int,
    policy: RankPolicy,
    *,
    module: bool = True,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    threads_per_worker: int | None = None,
    grace_s: float = 10.0,
    python: str = sys.executable,
) -> int:
    """Run ``nproc`` ranks of ``program`` on 127.0.0.1 under ``policy``; the job's exit status (0 or 1).

    ``program`` is ``["distlearn", "train", ...]`` run as ``-m`` when ``module`` is true, else a script and
    its arguments. ``threads_per_worker`` sets ``OMP_NUM_THREADS`` (default: the cores divided among the
    ranks). A job still running after ``timeout_s`` is stopped and a :class:`CommError` raised.
    """
    if nproc < 1:
        raise ConfigError(f"need at least one process, got {nproc}")
    base = dict(os.environ if env is None else env)
    port = free_port()
    base.update(
        {ENV_LAUNCHED: "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
         "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_WORLD_SIZE": str(nproc)}
    )  # fmt: skip
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    base["OMP_NUM_THREADS"] = str(threads_per_worker or max(1, (os.cpu_count() or 1) // nproc))
    command = [python, "-m", *program] if module else [python, *program]
    preexec = dies_with_this_process()  # each rank dies with this launcher (distlearn.lifeline)
    processes: list[subprocess.Popen] = []
    started = time.monotonic()
    with stop_signals_raise():
        try:
            for rank in range(nproc):
                rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
                group = processes[0].pid if processes else 0  # one new process group, led by rank 0
                start = {"preexec_fn": preexec, "process_group": group, "stdin": subprocess.DEVNULL}
                processes.append(subprocess.Popen(command, env=rank_env, **start))
            return _watch(processes, policy, started, timeout_s, grace_s)
        except Terminated as stop:
            _stop(processes)
            raise SystemExit(128 + stop.signum) from None
        except BaseException:  # the deadline and Ctrl-C included
            _stop(processes)
            raise


def _watch(
    processes: list[subprocess.Popen], policy: RankPolicy, started: float, timeout_s: float | None,
    grace_s: float,
) -> int:  # fmt: skip
    """Wait for every rank, applying ``policy`` as they end; the job's exit status."""
    ended: dict[int, tuple[int, float]] = {}  # rank -> (code, seconds into the job)
    stop_at: float | None = None
    failed: str | None = None  # the cause of a job that failed
    while len(ended) < len(processes):
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if rank in ended or (code := process.poll()) is None:
                continue
            ended[rank] = (code, now - started)
            if code == 0:
                continue
            when = f"{now - started:.1f} s into the job"
            if rank in policy.essential and failed is None:
                failed = f"{policy.name(rank)} ended ({_how(code)}) {when}"
                _say(f"error: {failed}; the job cannot go on without it and ends")
                stop_at = now + grace_s
            elif failed is None:
                _say(f"warning: {policy.name(rank)} died ({_how(code)}) {when}; the others go on")
        if len(ended) == len(processes):
            break
        if stop_at is not None and now > stop_at:
            _stop(processes)
            continue
        if timeout_s is not None and now - started > timeout_s:
            raise CommError(
                f"the job of {len(processes)} processes did not finish within {timeout_s:g} s and was "
                "stopped; raise the time limit or shrink the run"
            )
        time.sleep(0.1)
    _stop(processes)  # anything a rank started in its group
    if failed is None:
        bad = [rank for rank in sorted(policy.required) if ended.get(rank, (1, 0.0))[0] != 0]
        if bad:
            code, seconds = ended[bad[0]]
            failed = f"{policy.name(bad[0])} ended ({_how(code)}) {seconds:.1f} s into the job"
    if failed is not None:
        _say(f"error: the job failed: {failed}; its messages are above")
        return 1
    lost = [rank for rank, (code, _) in sorted(ended.items()) if code != 0]
    if lost:
        names = ", ".join(f"{policy.name(r)} ({_how(ended[r][0])} at {ended[r][1]:.1f} s)" for r in lost)
        _say(f"warning: finished without {names}. {policy.after_loss}".rstrip())
    return 0


def _stop(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM to the ranks' group, SIGKILL after ``grace_s`` to whatever is left; waits for every rank."""
    if not processes:
        return
    group = processes[0].pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in processes) and not _alive(group):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    for process in processes:
        process.wait()


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
