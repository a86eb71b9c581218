"""The torchrun agent's standard error relayed without the agent's own noise; the job's failure in a line.

A job that ``distlearn train --workers N`` starts under torchrun writes its workers' errors to standard error
(each a one-line ``distlearn train: error: ...`` for a :class:`distlearn.errors.DistlearnError`, or a Python
traceback for a bug), and torchrun's agent adds its own: timestamped log lines and, when a worker failed, a
``ChildFailedError`` traceback with a summary block naming the ranks and their exit codes. A user then reads
the workers' message once per rank, then forty lines of the agent's traceback, and gets exit status 1 for
what was a clear error. :class:`AgentOutput` reads the agent's standard error (which its workers inherit)
line by line in a thread and relays every line but the agent's: its log lines and its ``ChildFailedError``
traceback are dropped, and the summary block is parsed for the first failure (the root cause: rank and exit
code). The launcher then says in one line which rank failed and how (:meth:`AgentOutput.failure`).

A worker's own traceback (a bug) is relayed whole: a traceback is held until its exception line, and dropped
only when that line is torchrun's ``ChildFailedError``.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from typing import IO, Any

__all__ = ["AgentOutput"]

_AGENT_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")
"""A log line of torchrun's agent (glog format: level, date, time, pid, source file)."""

_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"


class AgentOutput:
    """Relay ``stream`` (the agent's standard error, bytes) to ``out`` in a thread; see the module docstring.

    Attributes:
        root_cause: ``(rank, exit code)`` of the first failed worker, from the agent's summary; None when
            the agent printed none (the job succeeded, or the agent was killed).
    """

    def __init__(self, stream: IO[bytes], out: Any = None) -> None:
        self.stream = stream
        self.out = out if out is not None else sys.stderr
        self.root_cause: tuple[int, int] | None = None
        self._held: list[str] = []  # a traceback, until its exception line says whose it is
        self._summary = False  # inside the agent's failure summary block
        self._in_root = False
        self._rank: int | None = None
        self._thread = threading.Thread(target=self._relay, name="distlearn-agent-output", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 10.0) -> None:
        """Wait until the stream ends (the agent and its workers closed it), then flush what is held."""
        self._thread.join(timeout)

    def failure(self) -> str | None:
        """One line naming the first failed worker and how it ended, from the agent's summary (or None)."""
        if self.root_cause is None:
            return None
        rank, code = self.root_cause
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"the job failed: rank {rank} was killed by {signal.Signals(-code).name}"
            return f"the job failed: rank {rank} was killed by signal {-code}"
        if code == 2:
            return f"the job failed: rank {rank} stopped with the error above (exit status 2)"
        return f"the job failed: rank {rank} exited with status {code} (its output is above)"

    # -- the thread -----------------------------------------------------------------------------------------

    def _relay(self) -> None:
        try:
            for raw in iter(self.stream.readline, b""):
                self._line(raw.decode("utf-8", errors="replace"))
        except (OSError, ValueError):  # the stream closed under us: nothing more to relay
            pass
        finally:
            self._write("".join(self._held))
            self._held = []

    def _line(self, line: str) -> None:
        if self._summary:
            self._parse_summary(line)
            return
        if self._held:
            self._held.append(line)
            if line.startswith((" ", "\t")) or not line.strip():
                return
            held, self._held = "".join(self._held), []
            if line.startswith(_CHILD_FAILED):  # the agent's own traceback: its summary follows
                self._summary = True
                return
            self._write(held)
            return
        if line.startswith("Traceback (most recent call last):"):
            self._held = [line]
            return
        if _AGENT_LOG.match(line):
            return
        self._write(line)

    def _parse_summary(self, line: str) -> None:
        text = line.strip()
        if text.startswith("Root Cause"):
            self._in_root = True
        elif self._in_root and text.startswith("rank"):
            found = re.search(r":\s*(\d+)", text)
            self._rank = int(found.group(1)) if found else None
        elif self._in_root and text.startswith("exitcode") and self._rank is not None:
            found = re.search(r":\s*(-?\d+)", text)
            if found and self.root_cause is None:
                self.root_cause = (self._rank, int(found.group(1)))
        elif self._in_root and text.startswith("====="):
            self._summary = self._in_root = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
