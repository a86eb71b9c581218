"""The shared-memory reducer (``shm``) on real processes over 127.0.0.1.

One torchrun job per world size runs every correctness case (tests/comm/shm_worker.py: exact against
``dist.all_reduce`` for integer values at every size and dtype, the same bits on every rank, async order,
non-contiguous tensors, shared buffers, reduce_scatter_/all_gather_, bytes sent): the session's job that
also runs test_reducers.py's cases (tests/comm/conftest.py), with these cases last. The failure jobs start
their ranks directly (torchrun's agent would stop the survivors as soon as a rank is killed): a rank killed
with SIGKILL, one that never calls, one killed during setup, and ranks that cannot see each other's
segments; afterwards no ``distlearn-shm-*`` file of theirs may be left in /dev/shm.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distlearn.comm import shm_segments
from distlearn.comm.reducers import chunk_bounds, create_reducer
from distlearn.errors import ConfigError
from distlearn.launch import free_port

WORKER = Path(__file__).with_name("shm_worker.py")
SHM = Path("/dev/shm")


def _pids(tmp_path: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(tmp_path.glob("pid*"))]


def _files_of(pids: list[int]) -> list[str]:
    """The ``distlearn-shm-*`` files in /dev/shm that one of ``pids`` created."""
    marks = {f"-p{pid}-" for pid in pids}
    return [
        name
        for name in os.listdir(SHM)
        if name.startswith("distlearn-shm-") and any(m in name for m in marks)
    ]


def _results(tmp_path: Path, world: int) -> list[dict | None]:
    files = [tmp_path / f"rank{r}.json" for r in range(world)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


def _spawn(tmp_path: Path, world: int, mode: str, *args: str, timeout_s: float = 90) -> list[int]:
    """Start ``world`` ranks of the worker directly (no agent) and wait for all of them; their exit codes."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
        env.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        env.pop("TORCHELASTIC_RUN_ID", None)
        command = [sys.executable, str(WORKER), mode, str(tmp_path), *args]
        processes.append(subprocess.Popen(command, env=env))
    deadline = time.monotonic() + timeout_s
    codes = []
    try:
        for process in processes:
            codes.append(process.wait(max(1.0, deadline - time.monotonic())))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shm_matches_gloo_allreduce(correctness_job, world):
    tmp_path, ranks = correctness_job(world)
    for rank in ranks:
        assert rank is not None and rank["failures"] == [], "\n".join(rank["failures"])
    results = [{**rank["shm"], "rank": rank["rank"]} for rank in ranks]
    for result in results:
        assert result is not None and result["failures"] == [], "\n".join(result["failures"])
        assert result["cases"] >= 48  # sizes x dtypes (fewer distinct sizes for R = 1)
    for n in (1000, 5, 1):  # peers read (n - n_r) + (R - 1) n_r of this rank's elements; 2 n in all
        sent = [result["bytes"][str(n)] for result in results]
        chunks = [stop - start for start, stop in chunk_bounds(n, world)]
        assert sent == [4 * ((n - chunks[r]) + (world - 1) * chunks[r]) for r in range(world)]
        assert sum(sent) == 4 * 2 * (world - 1) * n
    if world > 1:
        for result in results:
            message = result["mismatch"]
            assert message and message.startswith(f"shm allreduce: rank {result['rank']} and rank "), message
            assert "made different calls" in message and "elements of torch.float32" in message
            message = result["buffer_mismatch"]
            assert message and message.startswith("shm: shared_buffer called with different sizes"), message
            assert "rank 0: 10 x torch.float32, rank 1: 11 x torch.float32" in message
        pids = _pids(tmp_path)
        assert _files_of(pids) == [], "segments left behind by a finished job"
        assert not any(_files_of([pid]) for pid in pids)
        for result in results:  # nothing of this job was visible even while it ran, after setup
            assert not [name for name in result["files"] if any(f"-p{pid}-" in name for pid in pids)]


def test_a_peer_killed_with_sigkill_is_named_within_the_timeout(tmp_path):
    timeout_s = 30
    codes = _spawn(tmp_path, 2, "kill", str(timeout_s))
    assert codes[1] == -9 and codes[0] == 0
    result = _results(tmp_path, 2)[0]
    assert result["failures"] == [], result["failures"]
    pid = _pids(tmp_path)[1]
    assert result["error"].startswith(f"CommError: shm allreduce: rank 0 waited for rank 1 (pid {pid}) "), (
        result
    )
    assert "has exited; a peer may have died" in result["error"]
    assert result["seconds"] < 5  # the pid check, not the 30 s deadline
    assert _files_of(_pids(tmp_path)) == []


def test_a_peer_that_never_calls_is_named_after_the_timeout(tmp_path):
    codes = _spawn(tmp_path, 2, "hang", "2")
    assert codes == [0, 0]
    result = _results(tmp_path, 2)[0]
    assert result["failures"] == [], result["failures"]
    assert re.match(
        r"CommError: shm allreduce: rank 0 timed out after 2 s waiting for rank 1 to ", result["error"]
    )
    assert 2 <= result["seconds"] < 10
    assert _files_of(_pids(tmp_path)) == []


def test_a_rank_killed_during_setup_leaves_a_file_that_the_next_start_removes(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    codes = _spawn(first, 2, "setup-kill", "30")
    assert codes[1] == -9
    result = _results(first, 2)[0]
    assert result["error"] and result["error"].startswith(
        "CommError: shm allreduce: rank 0 could not exchange"
    )
    dead = _pids(first)[1]
    left = _files_of([dead])
    assert len(left) == 1 and "-r1-data-" in left[0], left  # the killed rank's own segment, nothing else
    assert _files_of([_pids(first)[0]]) == []
    second = tmp_path / "second"
    second.mkdir()
    assert _spawn(second, 2, "once", "30") == [0, 0]  # a new job's setup removes dead pids' files
    assert [result["error"] for result in _results(second, 2)] == [None, None]
    assert _files_of([dead]) == [] and _files_of(_pids(second)) == []


def test_ranks_that_cannot_see_each_others_segments_get_a_config_error(tmp_path):
    elsewhere = tmp_path / "other-host-shm"
    elsewhere.mkdir()
    codes = _spawn(tmp_path, 2, "invisible", "30", str(elsewhere))
    assert codes == [0, 0]
    for result in _results(tmp_path, 2):
        assert result["failures"] == [], result["failures"]
        error = result["error"]
        assert error.startswith("ConfigError: shm: rank "), error
        assert "needs every rank of the group on one host" in error and "--reducer hierarchical" in error
    assert _files_of(_pids(tmp_path)) == [] and os.listdir(elsewhere) == []


def test_stale_files_of_dead_pids_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(shm_segments.DIRECTORY_ENV, str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"distlearn-shm-abc-r0-data-p{gone.pid}-00ff"
    live = tmp_path / f"distlearn-shm-abc-r1-data-p{os.getpid()}-00ff"
    other = tmp_path / "someone-else"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert shm_segments.remove_stale() == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()


def test_options_and_bad_input_are_clear_errors():
    reducer = create_reducer("shm", piece_bytes=4096, timeout_s=3)
    assert reducer.piece_bytes == 4096 and reducer.timeout_s == 3 and reducer.bytes_sent == 0
    with pytest.raises(ConfigError, match="piece_bytes must be an integer between 64"):
        create_reducer("shm", piece_bytes=8)
    with pytest.raises(ConfigError, match="expected a torch.Tensor"):
        reducer.allreduce_([1.0])
    with pytest.raises(ConfigError, match="dtype torch.bool is not supported"):
        reducer.allreduce_(torch.ones(3, dtype=torch.bool))
