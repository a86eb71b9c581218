"""Start the ranks of a job as plain processes on 127.0.0.1 (no torchrun), each logging to a file.

The c10d rendezvous variables are set by hand, as torchrun would; the processes get one thread each, and a
process still running at the deadline is killed, so a test never leaves one behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from distlearn.launch import free_port

__all__ = ["run_ranks"]


def run_ranks(command: list[str], ranks: int, out: Path, timeout: float) -> list[int]:
    """Run ``command`` as ranks ``0 .. ranks-1`` of one job; their exit codes (``out/log<rank>.txt``)."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in range(ranks):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
        )  # fmt: skip
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 -- closed below
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    codes = []
    for process, log in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
        log.close()
    return codes
