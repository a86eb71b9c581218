"""Helpers of tests/comm's torchrun jobs (tests/comm/conftest.py, test_reducers.py): start reducer_worker.py
on R ranks and read back each rank's results."""

from __future__ import annotations

import json
import time
from pathlib import Path

from distlearn.comm.shm_segments import pid_alive
from distlearn.launch import launch_local

WORKER = Path(__file__).with_name("reducer_worker.py")


def run_reducer_job(out: Path, world: int, *args: str, timeout_s: float = 150) -> list[dict]:
    """reducer_worker.py ``args[0] OUT args[1:]`` on ``world`` ranks; each rank's ``rank{r}.json`` (None
    where missing). The job must succeed and leave no worker behind."""
    command = [str(WORKER), *args[:1], str(out), *args[1:]]
    code = launch_local(command, world, module=False, timeout_s=timeout_s)
    assert code == 0
    time.sleep(0.3)
    pids = [int(p.read_text()) for p in out.glob("pid*")]
    assert len(pids) == world and not any(pid_alive(pid) for pid in pids), "a worker outlived the job"
    files = [out / f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]
