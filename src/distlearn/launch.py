"""Processes and roles: the torchrun launcher underneath ``--workers N``, and process-group set-up.

One code path for one machine and many: ``distlearn train --workers N`` starts torch's own elastic
launcher (``python -m torch.distributed.run``, i.e. ``torchrun``) on this machine with a c10d rendezvous on
127.0.0.1, and every worker then calls :func:`init_distributed`, which reads the rendezvous from torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). On several machines
the user runs ``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:PORT -m distlearn train ...``
themselves: the workers see the same environment, so nothing else changes.

Every process this module starts ends by itself: the launcher runs in its own process group, is waited for
with a deadline, and on a deadline, an error or Ctrl-C the whole group is terminated, then killed. Whatever
kills the launching process or torchrun's agent, ``kill -9`` included, the rest of the job dies with it
(:mod:`distlearn.lifeline`). The rendezvous is bounded by the job's ``--comm-timeout``, torchrun's as well
as the workers'.

Libraries: ``torch.distributed`` (c10d; gloo on CPU, NCCL on GPU: the backend follows the device the
caller computes on, not what the machine has) and ``torch.distributed.run``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distlearn.agent_output import AgentOutput
from distlearn.devices import backend_for
from distlearn.errors import CommError, ConfigError
from distlearn.lifeline import (
    ENV_LAUNCHER_PID,
    ENV_PID_DIR,
    dies_with_this_process,
    new_pid_dir,
    stop_recorded,
    tie_to_agent,
)

__all__ = [
    "DistContext",
    "ENV_LAUNCHED",
    "Terminated",
    "free_port",
    "in_torchrun",
    "init_distributed",
    "launch_local",
    "restart_count",
    "shutdown",
    "stop_group",
    "stop_signals_raise",
    "torchrun_command",
    "wait_or_stop",
]

ENV_LAUNCHED = "DISTLEARN_LAUNCHED"
"""Set in every worker that :func:`launch_local` starts, so a worker never launches workers of its own."""

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0 does the job's I/O: progress, metrics summary, checkpoints, plots."""
        return self.rank == 0


def in_torchrun() -> bool:
    """True when this process was started by torchrun (the rendezvous variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def init_distributed(
    backend: str | None = None, *, timeout_s: float = 60.0, device: torch.device | str | None = None
) -> DistContext:
    """Join the job described by torchrun's environment and return this process's place in it.

    ``backend`` defaults to the one of ``device`` (:func:`distlearn.devices.backend_for`): NCCL for a CUDA
    device, gloo for the CPU or no device (the tensors the caller communicates live where it computes,
    whatever the machine has). For NCCL on a CUDA device ``torch.cuda.set_device(device)`` comes first, so
    NCCL's communicator and the collectives' streams are on this process's GPU. ``timeout_s`` bounds the
    rendezvous and every collective of the default group: a peer that dies or hangs makes the others fail
    within it instead of waiting forever. Idempotent: when the default group already exists its context is
    returned.
    """
    if not dist.is_available():
        raise CommError("this torch build has no torch.distributed; install a build with distributed support")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
    backend = backend or backend_for(device)
    if backend == "nccl" and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # (not for gloo: a CPU-only rank makes no CUDA context)
    if dist.is_initialized():
        return DistContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            backend=str(dist.get_backend()),
            timeout_s=timeout_s,
        )
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"no distributed job to join: {', '.join(missing)} not set. Start workers with "
            "`distlearn train --workers N ...` on one machine, or under `torchrun ... -m distlearn ...`"
        )
    tie_to_agent()  # a worker of torchrun's agent dies with it (distlearn.lifeline)
    if (
        backend == "gloo"
        and "GLOO_SOCKET_IFNAME" not in os.environ
        and _is_loopback(os.environ["MASTER_ADDR"])
    ):
        # gloo otherwise picks the interface the hostname resolves to; on loopback jobs use loopback.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = _rendezvous_store(timeout_s)
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    except Exception as error:  # rendezvous failures come as several exception types
        raise CommError(
            f"rank {os.environ['RANK']}: could not join the job at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
            f"({type(error).__name__}: {error}); check that every worker started and the port is free"
        ) from error
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ["LOCAL_RANK"]),
        backend=backend,
        timeout_s=timeout_s,
    )


def _rendezvous_store(timeout_s: float) -> tuple[dist.Store, int, int]:
    """The job's c10d store from torchrun's environment, reached within ``timeout_s`` or a CommError.

    torch's own ``env://`` rendezvous (the store that rank 0 hosts, or torchrun's agent's store) bounds
    connecting, but not the handshake after it: a program that holds the port, accepts connections and never
    answers keeps a rank waiting forever. So the store is made in a thread and waited for with a deadline; a
    thread still stuck there is left behind (a daemon: it ends with the process), with the error raised.
    After a restart by torchrun (whose store serves every attempt) the keys go under a prefix of their own,
    or a rank would read the addresses that the failed attempt's ranks published.
    """
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    rank_name = f"rank {os.environ['RANK']}"
    timeout = timedelta(seconds=timeout_s)
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            store.set_timeout(timeout)
            if restart_count():  # torchrun's store outlives a restart: keep the failed attempt's keys apart
                store = dist.PrefixStore(f"distlearn-restart-{restart_count()}", store)
            # what init_process_group does with a store it made itself: the default group's keys apart
            result["value"] = (dist.PrefixStore("default_pg", store), rank, world_size)
        except Exception as error:  # noqa: BLE001 -- reported below, in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=connect, name="distlearn-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise CommError(
            f"{rank_name}: the rendezvous at {address} did not answer within {timeout_s:g} s: the port is "
            "likely held by another program that accepts connections but is not this job's store (or rank "
            "0 is stuck); free the port or choose another (MASTER_PORT, or torchrun's --rdzv-endpoint), "
            "or raise --comm-timeout"
        )
    error = result.get("error")
    if error is not None:
        held = "EADDRINUSE" in str(error) or "address already in use" in str(error)
        cause = (
            "the port is held by another program; free it or choose another"
            if held
            else "check that every worker started and the port is free"
        )
        raise CommError(
            f"{rank_name}: could not join the job at {address} within {timeout_s:g} s "
            f"({type(error).__name__}: {error}); {cause}"
        ) from error
    return result["value"]


def restart_count() -> int:
    """How many times torchrun's agent has restarted this job's workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def shutdown() -> None:
    """Leave the job (destroy the default process group) if this process joined one."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    from distlearn.comm.groups import release_groups

    release_groups()  # the communication layer's cached side groups go before the groups they mirror
    dist.destroy_process_group()
    # free the groups' C++ objects (and their threads) now, while the interpreter is whole, not at exit
    gc.collect()


def _is_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"port {port} on {host} is in use ({error.strerror}); pass another port to launch_local "
                "(port=...), or port=0 and a free one is chosen"
            ) from error


def torchrun_command(
    program: list[str],
    nproc: int,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    module: bool = True,
    python: str = sys.executable,
    max_restarts: int = 0,
    rdzv_timeout_s: float | None = None,
) -> list[str]:
    """The ``torchrun`` command line that starts ``nproc`` workers of ``program`` on this machine.

    ``program`` is ``["distlearn", "train", ...]`` run as ``-m`` when ``module`` is true, else a script path
    and its arguments. Port 0 lets the rendezvous pick a free port. ``max_restarts``: how many times the
    agent starts the whole group again after a worker fails (default 0: a worker that fails ends the job,
    with its error shown, instead of a silent retry). ``rdzv_timeout_s`` bounds the agent's own rendezvous
    (joining it, and each read from its store; whole seconds, rounded up).
    """
    if nproc < 1:
        raise ConfigError(f"need at least one worker, got {nproc}")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {max_restarts}")
    command = [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{host}:{port}",
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.2",
    ]
    if rdzv_timeout_s is not None:
        seconds = max(1, math.ceil(rdzv_timeout_s))
        command += ["--rdzv-conf", f"join_timeout={seconds},read_timeout={seconds}"]
    if module:
        command.append("-m")
    return command + list(program)


def launch_local(
    program: list[str],
    nproc: int,
    *,
    timeout_s: float | None = None,
    port: int = 0,
    module: bool = True,
    env: dict[str, str] | None = None,
    threads_per_worker: int | None = None,
    max_restarts: int = 0,
    comm_timeout_s: float | None = None,
) -> int:
    """Run ``nproc`` workers of ``program`` under torchrun on 127.0.0.1 and return the job's exit code.

    The launcher and its workers share a new session, so on a ``timeout_s`` deadline or Ctrl-C every one
    of them is stopped (SIGTERM, then SIGKILL after 5 s). ``threads_per_worker`` sets ``OMP_NUM_THREADS``
    (default: the machine's cores divided among the workers, at least 1). ``max_restarts``: torchrun's
    restarts of the whole group after a worker fails; ``comm_timeout_s`` bounds torchrun's rendezvous.

    This process owns the job (:mod:`distlearn.lifeline`): if it dies, however it dies, the agent and the
    workers die with it; if the agent dies (say ``kill -9``), the workers die with it, and a CommError names
    the agent and its signal once every worker is gone.

    The agent's standard error (and its workers', which they inherit) is relayed without the agent's own log
    lines and ``ChildFailedError`` traceback (:mod:`distlearn.agent_output`); when a worker failed, one line
    names it and how it ended, and the code returned is 2 when it stopped with a distlearn error (its own
    message, above, says what and how to fix it), else the agent's.
    """
    if port:
        _check_port_free("127.0.0.1", port)
    child_env = dict(os.environ if env is None else env)
    child_env[ENV_LAUNCHED] = "1"
    child_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // nproc)
    child_env["OMP_NUM_THREADS"] = str(threads)
    command = torchrun_command(
        program, nproc, port=port, module=module, max_restarts=max_restarts, rdzv_timeout_s=comm_timeout_s
    )
    pid_dir = new_pid_dir()
    child_env[ENV_LAUNCHER_PID] = str(os.getpid())
    child_env[ENV_PID_DIR] = pid_dir
    try:
        # the job runs in its own session (so a stop can reach every process of it at once), and the agent
        # gets a parent-death signal: it dies with this process
        process = subprocess.Popen(
            command,
            env=child_env,
            start_new_session=True,
            preexec_fn=dies_with_this_process(),
            stderr=subprocess.PIPE,
        )
        relay = AgentOutput(process.stderr)
        try:
            code = wait_or_stop(process, timeout_s)
        except subprocess.TimeoutExpired:
            raise CommError(
                f"the job of {nproc} workers did not finish within {timeout_s:g} s and was stopped; "
                "raise the time limit or shrink the run"
            ) from None
        finally:
            relay.join()
        failure = relay.failure() if code > 0 else None
        if failure is not None:
            command_name = " ".join(program[:2]) if program[:1] == ["distlearn"] else "distlearn"
            print(f"{command_name}: error: {failure}", file=sys.stderr, flush=True)
            assert relay.root_cause is not None
            return 2 if relay.root_cause[1] == 2 else code
        if code < 0:  # the agent itself was killed: its workers die with it; make sure, then say so
            stop_recorded(pid_dir)
            raise CommError(
                f"the torchrun agent (pid {process.pid}) was killed by {_signal_name(-code)}; "
                "the workers were stopped"
            )
        return code
    finally:
        stop_recorded(pid_dir)
        shutil.rmtree(pid_dir, ignore_errors=True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def wait_or_stop(process: subprocess.Popen, timeout_s: float | None) -> int:
    """Wait for ``process``, the leader of a process group of its own, and return its exit code.

    If it is not done within ``timeout_s`` (``subprocess.TimeoutExpired`` is raised), or this process is
    stopped meanwhile (SIGTERM/SIGHUP from `timeout`, `kill` or a closed terminal: ``SystemExit(128 +
    signal)``; Ctrl-C), the whole group is stopped first (:func:`stop_group`), so nothing is orphaned.
    """
    with stop_signals_raise():
        try:
            return process.wait(timeout=timeout_s)
        except Terminated as stop:
            stop_group(process)
            raise SystemExit(128 + stop.signum) from None
        except BaseException:  # the timeout and Ctrl-C included
            stop_group(process)
            raise


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived inside :func:`stop_signals_raise`; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise :class:`Terminated` instead of ending the process at once.

    A process that started children in sessions of their own (so that one signal stops a whole job) must
    stop them when it is itself stopped (`timeout`, `kill`, a closed terminal); with the default handlers it
    would die and orphan them. The exception lets its ``except``/``finally`` blocks do that. Main thread
    only (elsewhere the block changes nothing); the previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Terminate the process group that ``process`` leads, then kill what is left after ``grace_s``.

    SIGTERM first, so that a member which launched a session of its own (``launch_local`` does) can stop
    that one too before it goes; SIGKILL cannot be caught and would orphan it.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process.poll() is not None and not _group_alive(process.pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
