"""The local process pool contract: results in rank order, a failing rank named with its traceback, a
deadline, and no process left behind on a failure, a timeout, SIGTERM or the parent's death.

Real processes (spawn); every process the pool started is checked gone by its pid (/proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pool_cases  # noqa: E402

from distlearn.errors import CommError, ConfigError  # noqa: E402
from distlearn.pool import PoolTimeout, ProcessPool, WorkerError, WorkerFailure, run_pool  # noqa: E402

SRC = str(HERE.parents[1] / "src")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(pid) for pid in pids)


def _noted(out: Path, label: str, count: int, within_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while len(list(out.glob(f"{label}[0-9]*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(int(p.read_text()) for p in out.glob(f"{label}[0-9]*"))


@pytest.mark.timeout(60)
def test_results_come_back_in_rank_order_and_every_process_ends():
    with ProcessPool(pool_cases.square_late, 3, (3,), name="squares") as pool:
        results = pool.wait(timeout_s=50)
        pids = pool.pids
    assert results == [(0, 0), (1, 1), (2, 4)]  # rank 2 answered first, rank 0 last
    assert not pool.failures
    assert len(set(pids)) == 3 and _gone_within(pids, 0)
    assert run_pool(pool_cases.square_late, 1, (1,), timeout_s=50) == [(0, 0)]


@pytest.mark.timeout(60)
def test_a_users_error_in_a_worker_comes_back_as_its_message_without_a_traceback():
    with pytest.raises(WorkerError) as caught:
        run_pool(pool_cases.refuse, 1, name="demo", timeout_s=50)
    message = str(caught.value)
    assert message == (
        "demo failed: process 0 of 1 raised DivergenceError: rank 0: training diverged at step 3 on purpose; "
        "the other processes were stopped"
    )


@pytest.mark.timeout(60)
def test_a_worker_that_raises_names_its_rank_and_traceback_and_the_others_are_stopped(tmp_path):
    start = time.monotonic()
    pool = ProcessPool(pool_cases.fail_on, 3, (1, str(tmp_path)), name="demo")
    with pytest.raises(WorkerError) as caught, pool:
        pool.wait(timeout_s=50)
    message = str(caught.value)
    assert isinstance(caught.value, CommError) and caught.value.rank == 1
    assert message.startswith(
        "demo failed: process 1 of 3 raised ValueError: rank 1 got a bad input on purpose"
    )
    assert "Traceback (most recent call last)" in message and "pool_cases.py" in message  # the worker's own
    assert caught.value.failure.traceback and "in fail_on" in caught.value.failure.traceback
    assert time.monotonic() - start < 30  # ranks 0 and 2 would sleep 60 s: they were stopped
    assert _gone_within(pool.pids, 0) and _gone_within(_noted(tmp_path, "pid", 3), 1)


@pytest.mark.timeout(60)
def test_a_worker_past_the_deadline_is_stopped_with_what_it_started(tmp_path):
    pool = ProcessPool(pool_cases.hang, 2, (str(tmp_path), True), name="hangs", grace_s=2)
    expected = r"hangs: 2 of 2 processes \(ranks 0, 1\) did not finish within 3 s and were stopped"
    with pytest.raises(PoolTimeout, match=expected), pool:
        pool.wait(timeout_s=3)
    grandchildren = _noted(tmp_path, "grandchild", 2, within_s=0)
    assert len(grandchildren) == 2  # each worker had started a `sleep 600` in its process group
    assert _gone_within(pool.pids, 0) and _gone_within(grandchildren, 2)


@pytest.mark.timeout(60)
def test_without_stop_on_failure_the_others_carry_on_and_the_failure_is_recorded():
    with ProcessPool(pool_cases.exit_without_result, 3, (3,), name="carry", stop_on_failure=False) as pool:
        seen = []
        while pool.running:
            seen += pool.poll()
            time.sleep(0.05)
        results = pool.wait(timeout_s=30)
    assert results == ["rank 0 done", None, "rank 2 done"]
    assert [failure.rank for failure in seen] == [1] and pool.failures[1].exitcode == 3
    assert pool.failures[1].summary == "exit code 3" and pool.failures[1].traceback is None


def _parent_script(out: Path) -> str:
    return textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{SRC!r}, {str(HERE)!r}]
        import pool_cases
        from distlearn.pool import run_pool
        run_pool(pool_cases.hang, 2, ({str(out)!r},), name="hangs", timeout_s=300, grace_s=2)
        """
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_parent_stops_every_process(tmp_path, signum):
    # as from a terminal: a shell's background job (CI started with `&`) passes SIGINT on ignored, and a
    # Python started so never turns Ctrl-C into KeyboardInterrupt (the nohup convention)
    parent = subprocess.Popen(
        [sys.executable, "-c", _parent_script(tmp_path)],
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        pids = _noted(tmp_path, "pid", 2)
        assert len(pids) == 2, "the pool's processes did not start"
        parent.send_signal(signum)
        code = parent.wait(timeout=30)
        # SIGTERM/SIGHUP: SystemExit(128 + signal); Ctrl-C: KeyboardInterrupt, which Python ends by SIGINT
        assert code == (-signum if signum == signal.SIGINT else 128 + signum)
        assert _gone_within(pids, 0)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


@pytest.mark.timeout(90)
def test_a_parent_killed_outright_leaves_no_process_behind(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _parent_script(tmp_path)], start_new_session=True)
    pids = _noted(tmp_path, "pid", 2)
    parent.kill()  # SIGKILL: the parent can stop nothing; each process notices it is orphaned
    parent.wait()
    assert len(pids) == 2 and _gone_within(pids, 10)


def test_bad_use_is_a_clear_error_and_failures_read_plainly():
    with pytest.raises(ConfigError, match="at least one process"):
        ProcessPool(pool_cases.hang, 0)
    assert WorkerFailure(1, exitcode=-9).summary == "killed by signal 9 (SIGKILL)"
    assert WorkerFailure(0, error="OSError: disk full", exitcode=1).summary == "raised OSError: disk full"
