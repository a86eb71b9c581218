"""Local process pools: N processes on this machine running one function, bounded and stopped as one.

One contract for every pool of local processes (Hogwild!, A3C's actor-learners, the real runs of
"asynchrony begets momentum"; a torchrun job is :func:`distlearn.launch.launch_local`)::

    with ProcessPool(target, processes, args, name="hogwild") as pool:   # starts them
        results = pool.wait(timeout_s)      # [target(0, *args), ..., target(N-1, *args)]

* **start**: process ``rank`` (``0 .. N-1``, ``spawn`` context) runs ``target(rank, *args)``; ``target`` is a
  module-level function and ``args`` are picklable (queues, barriers, shared values from
  :func:`spawn_context`; tensors go as shared memory). Each process leads a process group of its own and
  ends itself, with that group, if the parent dies (even by SIGKILL).
* **results or errors**: each process sends back its return value (``wait`` returns them in rank order), or
  its exception's type, message and traceback text (none for a ``DistlearnError``, whose message is meant
  for the user and says it all). One that raises, or exits without a result
  (``os._exit``, a signal), is a :class:`WorkerFailure`: the others are stopped at once and
  :class:`WorkerError` (a ``CommError``) names the rank, the exception and its traceback. With
  ``stop_on_failure=False`` failures are only recorded (``failures``, :meth:`ProcessPool.poll`).
* **deadline**: :meth:`ProcessPool.wait` returns within ``timeout_s``, or stops every process and raises
  :class:`PoolTimeout` (a ``CommError``).
* **stop**: on a failure, the deadline, SIGTERM/SIGHUP (then ``SystemExit(128 + signal)``), Ctrl-C, any
  exception in the ``with`` block, or at its end, every process still running is stopped as
  ``launch.wait_or_stop`` stops a job: SIGTERM to its process group, SIGKILL ``grace_s`` later, and reaped.
  No process of the pool outlives the block.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from distlearn.errors import CommError, ConfigError, DistlearnError

__all__ = ["PoolTimeout", "ProcessPool", "WorkerError", "WorkerFailure", "run_pool", "spawn_context"]

PARENT_CHECK_S = 0.5
"""How often a pool process checks that its parent is still there."""


def spawn_context() -> Any:
    """The ``multiprocessing`` context every pool uses (``spawn``): make its queues and barriers from it."""
    return multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class WorkerFailure:
    """How process ``rank`` of a pool failed: an exception (``error``, ``traceback``) or just an exit code."""

    rank: int
    error: str | None = None  # "ValueError: bad input", from the process
    traceback: str | None = None  # the process's traceback text
    exitcode: int | None = None  # set when the process ended without a word

    @property
    def summary(self) -> str:
        """One line: ``raised ValueError: ...``, ``exit code 3`` or ``killed by signal 9 (SIGKILL)``."""
        if self.error is not None:
            return f"raised {self.error}"
        if self.exitcode is not None and self.exitcode < 0:
            with contextlib.suppress(ValueError):
                return f"killed by signal {-self.exitcode} ({signal.Signals(-self.exitcode).name})"
            return f"killed by signal {-self.exitcode}"
        return f"exit code {self.exitcode}"


class WorkerError(CommError):
    """A pool process failed; ``failure`` says which and how (its traceback text included)."""

    def __init__(self, message: str, failure: WorkerFailure) -> None:
        super().__init__(message)
        self.failure = failure
        self.rank = failure.rank


class PoolTimeout(CommError):
    """A pool's processes did not finish within the deadline; they were stopped."""


class ProcessPool:
    """``processes`` local processes running ``target(rank, *args)``: the contract of the module docstring.

    Args:
        target: a module-level function; its return value is the process's result.
        processes: how many (``N``); ranks ``0 .. N-1``.
        args: passed to every process after its rank.
        name: what the errors call the pool (``"hogwild failed: process 1 raised ..."``).
        stop_on_failure: stop the others and raise :class:`WorkerError` at the first failure (default);
            ``False`` records failures and lets the others run.
        grace_s: between SIGTERM and SIGKILL when stopping; also how long processes that all sent their
            result may take to exit before they are stopped.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        processes: int,
        args: Sequence[Any] = (),
        *,
        name: str = "pool",
        stop_on_failure: bool = True,
        grace_s: float = 5.0,
    ) -> None:
        if processes < 1:
            raise ConfigError(f"a process pool needs at least one process, got {processes}")
        self.target, self.size, self.args, self.name = target, processes, tuple(args), name
        self.stop_on_failure, self.grace_s = stop_on_failure, grace_s
        self.failures: dict[int, WorkerFailure] = {}
        self._results: dict[int, Any] = {}
        self._processes: list[Any] = []
        self._readers: dict[int, Any] = {}  # rank -> the pipe its one message comes through
        self._ended: set[int] = set()  # ranks whose process has exited and been reaped
        self._stopping = False  # from now on an ending process is one we stopped, not a failure
        self._stopped = False
        self._signals = contextlib.ExitStack()

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> ProcessPool:
        """Start every process (once)."""
        if self._processes:
            raise ConfigError(f"the {self.name} pool was already started; make a new ProcessPool")
        context = spawn_context()
        try:
            for rank in range(self.size):
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=_pool_process,
                    args=(self.target, rank, self.args, writer, os.getpid(), self.grace_s),
                    name=f"{self.name}-{rank}",
                )
                try:
                    process.start()
                except BaseException:
                    reader.close()
                    raise
                finally:
                    writer.close()  # the child holds its own end; ours would hide its EOF
                self._processes.append(process)
                self._readers[rank] = reader
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> ProcessPool:
        from distlearn.launch import stop_signals_raise  # here: a pool process never needs torch's import

        self._signals.enter_context(stop_signals_raise())
        try:
            return self.start()
        except BaseException:
            self._signals.close()
            raise

    def __exit__(self, kind: Any, error: BaseException | None, trace: Any) -> None:
        from distlearn.launch import Terminated

        try:
            self.stop()
        finally:
            self._signals.close()
        if isinstance(error, Terminated):
            raise SystemExit(128 + error.signum) from None

    @property
    def pids(self) -> list[int]:
        """The process ids, in rank order."""
        return [int(process.pid) for process in self._processes]

    @property
    def running(self) -> bool:
        """Some process had not ended at the last :meth:`poll` or :meth:`wait`."""
        return len(self._ended) < len(self._processes)

    # -- waiting ---------------------------------------------------------------------------------------------

    def poll(self) -> list[WorkerFailure]:
        """Take in what the processes sent or how they ended, without waiting; return the new failures.

        With ``stop_on_failure`` a failure stops the pool and raises :class:`WorkerError` instead.
        """
        known = set(self.failures)
        self._collect(0.0)
        self._raise_failure()
        return [failure for rank, failure in self.failures.items() if rank not in known]

    def wait(self, timeout_s: float | None = None, *, every: Callable[[], None] | None = None) -> list[Any]:
        """Wait for every process to end and return their results in rank order.

        A failed rank's entry is ``None`` (with ``stop_on_failure=False``; see ``failures``). Past
        ``timeout_s`` every process still running is stopped and :class:`PoolTimeout` raised. ``every`` is
        called about every 50 ms meanwhile (e.g. to empty a queue the processes write to, so that none
        blocks on a full pipe at exit).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        all_reported_at: float | None = None
        while True:
            self._raise_failure()
            if not self.running:
                break
            now = time.monotonic()
            if all_reported_at is None and len(self._results) + len(self.failures) == self.size:
                all_reported_at = now
            if all_reported_at is not None and now - all_reported_at > self.grace_s:
                self.stop()  # every result is in; a process that does not exit after it is only slow to go
                break
            if deadline is not None and now >= deadline:
                late = [rank for rank in range(self.size) if rank not in self._ended]
                self.stop()
                raise PoolTimeout(
                    f"{self.name}: {len(late)} of {self.size} processes (ranks {', '.join(map(str, late))}) "
                    f"did not finish within {timeout_s:g} s and were stopped; raise the time limit or "
                    "shrink the run"
                )
            slice_s = 0.05 if every is not None else 1.0
            self._collect(slice_s if deadline is None else max(0.0, min(slice_s, deadline - now)))
            if every is not None:
                every()
        return [self._results.get(rank) for rank in range(self.size)]

    def stop(self) -> None:
        """Stop every process still running (SIGTERM to its group, SIGKILL ``grace_s`` later) and reap it.

        A second Ctrl-C or SIGTERM meanwhile skips the rest of the grace period, not the kill.
        """
        from distlearn.launch import Terminated

        if self._stopped:
            return
        self._stopping = True
        if self._anything_left():
            self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        interrupted: BaseException | None = None
        try:
            while time.monotonic() < deadline and self._anything_left():
                if self.running:
                    self._collect(min(0.1, max(0.0, deadline - time.monotonic())))
                else:
                    time.sleep(0.05)  # only what a process started is left in its group
        except (KeyboardInterrupt, Terminated) as error:
            interrupted = error
        if self._anything_left():
            self._signal_all(signal.SIGKILL)
        for rank, process in enumerate(self._processes):
            process.join()
            self._ended.add(rank)
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._stopped = True
        if interrupted is not None:
            raise interrupted

    # -- inside ----------------------------------------------------------------------------------------------

    def _anything_left(self) -> bool:
        return self.running or any(_group_alive(process.pid) for process in self._processes)

    def _signal_all(self, number: int) -> None:
        """``number`` to every process group of the pool still there, and to each process not yet reaped."""
        for rank, process in enumerate(self._processes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, number)
            if rank not in self._ended:  # a reaped pid may already belong to someone else
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, number)

    def _collect(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a message or an exit, then take in every one that is ready."""
        readers = {reader: rank for rank, reader in self._readers.items()}
        sentinels = {
            process.sentinel: rank for rank, process in enumerate(self._processes) if rank not in self._ended
        }
        if not readers and not sentinels:
            return
        ready = multiprocessing.connection.wait([*readers, *sentinels], timeout_s)
        for item in ready:
            if item in readers:
                self._receive(readers[item])
        for item in ready:
            if item in sentinels:
                self._reap(sentinels[item])

    def _receive(self, rank: int) -> None:
        reader = self._readers.pop(rank)
        try:
            message = reader.recv()
        except (EOFError, OSError):  # it ended (or was stopped) before it sent anything
            return
        finally:
            reader.close()
        if message[0] == "result":
            self._results[rank] = message[1]
        elif not self._stopping:
            self.failures[rank] = WorkerFailure(rank, error=message[1], traceback=message[2])

    def _reap(self, rank: int) -> None:
        process = self._processes[rank]
        process.join()
        self._ended.add(rank)
        reader = self._readers.get(rank)
        if reader is not None and reader.poll():
            self._receive(rank)  # its message came in with its exit
        if rank not in self._results and rank not in self.failures and not self._stopping:
            self.failures[rank] = WorkerFailure(rank, exitcode=process.exitcode)

    def _raise_failure(self) -> None:
        if not (self.stop_on_failure and self.failures):
            return
        first, *others = self.failures.values()
        self.stop()
        also = "".join(f"; process {f.rank} also failed ({f.summary})" for f in others)
        details = f"\n--- process {first.rank} ---\n{first.traceback.rstrip()}" if first.traceback else ""
        raise WorkerError(
            f"{self.name} failed: process {first.rank} of {self.size} {first.summary}{also}; the other "
            f"processes were stopped{details}",
            first,
        )


def run_pool(
    target: Callable[..., Any],
    processes: int,
    args: Sequence[Any] = (),
    *,
    name: str = "pool",
    timeout_s: float | None = None,
    grace_s: float = 5.0,
) -> list[Any]:
    """Run ``target(rank, *args)`` in ``processes`` processes; return their results in rank order."""
    with ProcessPool(target, processes, args, name=name, grace_s=grace_s) as pool:
        return pool.wait(timeout_s)


# -- in each pool process ---------------------------------------------------------------------------------


def _pool_process(
    target: Callable[..., Any], rank: int, args: tuple[Any, ...], writer: Any, parent: int, grace_s: float
) -> None:
    """Run ``target(rank, *args)`` and send its result or its error (type, message, traceback) home."""
    own_group = _lead_own_group()
    threading.Thread(target=_end_with_parent, args=(parent, own_group, grace_s), daemon=True).start()
    try:
        message: tuple[Any, ...] = ("result", target(rank, *args))
    except BaseException as error:  # Ctrl-C and SystemExit included: the parent hears of every end
        shown = "" if isinstance(error, DistlearnError) else traceback.format_exc()  # (a user's error: none)
        message = ("error", f"{type(error).__name__}: {error}", shown)
    try:
        writer.send(message)
    except Exception as error:  # an unpicklable result
        message = ("error", f"{type(error).__name__}: its result could not be sent: {error}", "")
        writer.send(message)
    writer.close()
    if message[0] == "error":
        raise SystemExit(1)


def _lead_own_group() -> bool:
    """Make this process the leader of a new process group (so one signal reaches what it starts)."""
    try:
        os.setpgid(0, 0)
    except OSError:
        return False
    return True


def _end_with_parent(parent: int, own_group: bool, grace_s: float) -> None:
    """If the parent is gone (killed, it could not stop us), stop this process and its group."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    for number in (signal.SIGTERM, signal.SIGKILL):
        if own_group:
            os.killpg(0, number)
        else:
            os.kill(os.getpid(), number)
        time.sleep(grace_s)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
