"""The launcher of plain processes per rank (distlearn.ranklaunch): the failure policy, and no orphan.

The ranks here are small Python programs (no torch), so each case takes seconds: a lost non-essential rank
stops nobody, a failed essential rank ends the job within the grace period, a failed required rank fails the
job, and the ranks die with the launcher, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distlearn.ranklaunch import RankPolicy, launch_ranks

RANK = textwrap.dedent(
    """
    import os, sys, time
    out, rank = sys.argv[1], int(os.environ["RANK"])
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(out, f"env{rank}"), "w") as f:
        f.write(" ".join(os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")))
    plan = dict(item.split("=") for item in sys.argv[2:])  # rank=seconds:code
    seconds, code = plan.get(str(rank), "0:0").split(":")
    time.sleep(float(seconds))
    with open(os.path.join(out, f"done{rank}"), "w") as f:
        f.write(code)
    sys.exit(int(code))
    """
)

POLICY = RankPolicy(essential=frozenset({0}), required=frozenset({0, 1}), roles={0: "server"})


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "rank.py"
    path.write_text(RANK)
    return path


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _pids(out: Path, ranks: int) -> list[int]:
    return [int((out / f"pid{r}").read_text()) for r in range(ranks) if (out / f"pid{r}").is_file()]


def run(script: Path, out: Path, *plan: str, policy: RankPolicy = POLICY) -> tuple[int, float]:
    started = time.monotonic()
    code = launch_ranks([str(script), str(out), *plan], 3, policy, module=False, timeout_s=60, grace_s=2.0)
    return code, time.monotonic() - started


@pytest.mark.timeout(90)
def test_a_lost_worker_stops_nobody_and_the_job_succeeds_with_a_warning(script, tmp_path, capfd):
    code, _ = run(script, tmp_path, "2=0:7", "1=1.5:0", "0=2:0")
    assert code == 0
    assert [(tmp_path / f"done{r}").read_text() for r in range(3)] == ["0", "0", "7"]  # 0 and 1 went on
    assert (tmp_path / "env1").read_text() == "1 3 1 127.0.0.1"  # torchrun's variables, set by hand
    err = capfd.readouterr().err
    assert "warning: rank 2 died (exit status 7)" in err and "the others go on" in err
    assert "warning: finished without rank 2 (exit status 7 at" in err
    assert not any(_alive(pid) for pid in _pids(tmp_path, 3))


@pytest.mark.timeout(90)
def test_a_failed_essential_rank_ends_the_job_within_the_grace_period(script, tmp_path, capfd):
    code, seconds = run(script, tmp_path, "0=0.5:4", "1=50:0", "2=50:0")
    assert code == 1 and seconds < 40  # not the 50 s the others would have slept
    assert not (tmp_path / "done1").exists() and not (tmp_path / "done2").exists()
    err = capfd.readouterr().err
    assert "error: server rank 0 ended (exit status 4)" in err and "the job failed: server rank 0" in err
    assert not any(_alive(pid) for pid in _pids(tmp_path, 3))


@pytest.mark.timeout(90)
def test_a_failed_required_rank_fails_the_job_after_the_others_finish(script, tmp_path, capfd):
    code, _ = run(script, tmp_path, "1=0:3", "0=1:0", "2=1:0")
    assert code == 1
    assert [(tmp_path / f"done{r}").read_text() for r in range(3)] == ["0", "3", "0"]
    assert "the job failed: rank 1 ended (exit status 3" in capfd.readouterr().err


@pytest.mark.timeout(120)
def test_the_ranks_die_with_a_launcher_killed_by_sigkill(script, tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from distlearn.ranklaunch import RankPolicy, launch_ranks; "
         f"launch_ranks([{str(script)!r}, {str(tmp_path)!r}, '0=60:0', '1=60:0', '2=60:0'], 3, RankPolicy(), "
         "module=False, timeout_s=90)"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(_pids(tmp_path, 3)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _pids(tmp_path, 3)
        assert len(pids) == 3
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids)  # the parent-death signal
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in _pids(tmp_path, 3):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
