"""The launcher owns its job: kill -9 of the command, of torchrun's agent or of a worker leaves no process.

Each test starts a real 2-worker ``distlearn train`` job as a subprocess, waits until both workers train
(rank 0's metrics file has a record), kills one of its processes with SIGKILL and then measures how long the
rest of the job takes to go, by the pids seen in /proc. Whatever happens, every process seen is killed at
the end (launch_jobs.Job.close), so a failing test leaves none behind.
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
from launch_jobs import Job, alive, train_command, wait_gone

DATA = Path("/usr/share/datasets/fashion-mnist")
GONE_WITHIN_S = 5.0  # measured here: 0.1-0.3 s after the command's death, 0.1-3 s after the agent's

pytestmark = [
    pytest.mark.skipif(not DATA.is_dir(), reason="Fashion-MNIST is not installed here"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's"),
    pytest.mark.timeout(600),
]


def _start(tmp_path: Path) -> tuple[Job, int, dict[int, int]]:
    """A long sync job; returns it once both workers train, with its agent's pid and {rank: pid}."""
    out = tmp_path / "run"
    flags = [
        "--dataset", "fashion-mnist", "--model", "mlp", "--strategy", "sync", "--workers", "2",
        "--train-samples", "4096", "--test-samples", "200", "--batch-size", "128", "--steps", "100000",
        "--log-every", "5", "--no-checkpoints", "--tensorboard", "off",
    ]  # fmt: skip
    job = Job(train_command(out, *flags), tmp_path / "job.log")
    try:
        metrics = out / "metrics.jsonl"
        job.wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 400, "a metrics record")
        agent, workers = job.agent(), job.workers()
        assert agent is not None and sorted(workers) == [0, 1], job.output()
    except BaseException:
        job.close()
        raise
    return job, agent, workers


def test_kill_9_of_the_command_stops_the_agent_and_the_workers(tmp_path):
    job, agent, workers = _start(tmp_path)
    try:
        os.kill(job.cli.pid, signal.SIGKILL)
        seconds = wait_gone([agent, *workers.values()], GONE_WITHIN_S)
        print(f"job gone {seconds:.2f} s after kill -9 of the command")
        assert job.cli.wait(timeout=10) == -signal.SIGKILL
    finally:
        job.close()


def test_kill_9_of_the_agent_stops_the_workers_and_the_command_says_so(tmp_path):
    job, agent, workers = _start(tmp_path)
    try:
        started = time.monotonic()
        os.kill(agent, signal.SIGKILL)
        wait_gone(list(workers.values()), GONE_WITHIN_S)
        code = job.cli.wait(timeout=30)
        seconds = time.monotonic() - started
        print(f"workers gone and the command ended {seconds:.2f} s after kill -9 of the agent")
        assert code != 0
        message = f"the torchrun agent (pid {agent}) was killed by SIGKILL; the workers were stopped"
        lines = [line for line in job.output().splitlines() if message in line]
        assert len(lines) == 1, job.output()
        assert "Traceback" not in job.output()
    finally:
        job.close()


def test_kill_9_of_a_worker_ends_the_job_naming_its_rank(tmp_path):
    job, agent, workers = _start(tmp_path)
    try:
        started = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        code = job.cli.wait(timeout=120)
        print(f"the command ended {time.monotonic() - started:.2f} s after kill -9 of rank 1")
        assert code != 0
        output = job.output()
        assert "error: the job failed: rank 1 was killed by SIGKILL" in output, output
        assert "ChildFailedError" not in output, output  # torchrun's own traceback is not relayed
        wait_gone([agent, workers[0]], GONE_WITHIN_S)
    finally:
        job.close()


def test_a_worker_whose_agent_died_before_it_set_its_signal_exits(tmp_path):
    """The window between a worker's start and its prctl: the worker finds its agent gone and exits."""
    parent = textwrap.dedent(
        """
        import os, subprocess, sys
        env = dict(os.environ, TORCHELASTIC_RUN_ID="test", DISTLEARN_LAUNCHER_PID=str(os.getppid()))
        child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env)
        print(child.pid, flush=True)
        os._exit(0)  # the 'agent' dies at once, before its child has imported anything
        """
    )
    worker = "import time; from distlearn.lifeline import tie_to_agent; time.sleep(2); tie_to_agent(); "
    worker += "time.sleep(60)"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    started = subprocess.run(
        [sys.executable, "-c", parent, worker], env=env, capture_output=True, text=True, timeout=60
    )
    pid = int(started.stdout.split()[0])
    try:
        wait_gone([pid], 30)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
