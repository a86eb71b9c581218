"""The correctness job per world size that tests/comm's reducer and shm tests share.

One torchrun job per world size R runs tests/comm/reducer_worker.py's ``check`` (every algorithm against
``dist.all_reduce``), for R >= 2 its ``batched`` rounds, and tests/comm/shm_worker.py's shm ``check``: one
start of the R ranks for three sets of cases. It runs once per session, when the first test that needs it
asks; each test asserts on its part of the results (``results[rank][mode]``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comm_jobs import run_reducer_job  # noqa: E402


@pytest.fixture(scope="session")
def correctness_job(tmp_path_factory):
    """``correctness_job(R)``: (the job's directory, each rank's results), the job run once per session:
    modes ``check`` and ``shm`` on every R, ``batched`` for R >= 2 (no rounds between one rank)."""
    done: dict[int, tuple[Path, list[dict]]] = {}

    def get(world: int) -> tuple[Path, list[dict]]:
        if world not in done:
            out = tmp_path_factory.mktemp(f"comm-check-{world}")
            modes = "check,shm" if world == 1 else "check,batched,shm"
            done[world] = out, run_reducer_job(out, world, modes, timeout_s=600)
        return done[world]

    return get
