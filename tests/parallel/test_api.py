"""distlearn.parallelize() in a user's loop, as it is tried: under the real torchrun, as plain processes
(the ranks torchrun would start), and under plain python. The ranks run api_worker.py and print
``OK <check>`` lines; a check that fails prints ``FAILED <check>`` and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distlearn
from distlearn.errors import ConfigError
from distlearn.launch import free_port
from distlearn.parallel import strategy_class
from ranks import run_ranks

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "api_worker.py")
SRC = HERE.parents[1] / "src"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")


def _logs(out: Path, ranks: int) -> list[str]:
    return [(out / f"log{rank}.txt").read_text() for rank in range(ranks)]


@pytest.mark.timeout(150)
def test_accumulation_over_four_micro_batches_under_torchrun_equals_ddp_and_one_process():
    """The real ``torchrun --nproc-per-node 2``: 4 micro-batches (with and without no_sync) on 4 buckets,
    two reducers, equal to torch DDP and to one process on the full batch; two codecs' replicas equal.
    Every case is a new parallelize() after the previous one's close(), in the same processes."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "--max-restarts", "0", WORKER, "accumulate",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "FAILED" not in output, output
    for reducer in ("backend", "ring", "shm"):
        for no_sync in (True, False):
            case = f"reducer={reducer} no_sync={no_sync} buckets=4"
            for what in ("replicas equal", "equals torch DDP", "equals one process"):
                assert output.count(f"OK {case}: {what}") == 2, output
    assert output.count(": buckets in shared memory") == 4, output  # shm's zero-copy buckets, 2 ranks x 2
    assert output.count("OK compression=fp16: replicas equal") == 2, output
    assert output.count("OK compression=topk: replicas equal") == 2, output


@pytest.mark.timeout(150)
def test_checkpoint_resume_in_a_users_loop_equals_the_uninterrupted_run(tmp_path):
    names = ["sync", "sync-topk", "sync-powersgd", "local-sgd", "easgd"]
    codes = run_ranks([sys.executable, WORKER, "resume", ",".join(names)], 2, tmp_path, timeout=120)
    logs = _logs(tmp_path, 2)
    assert codes == [0, 0], logs
    for log in logs:
        for name in names:
            assert f"OK {name}: resumed run equals the uninterrupted one" in log, log


PS_JOBS = {2: ["plain", "local-steps", "easgd-async"], 3: ["staleness-aware", "softsync", "backup-workers"]}
"""The parameter-server variants by job size: a 3-rank job has two workers, so pushes can be stale."""


@pytest.fixture(scope="module")
def ps_jobs(tmp_path_factory) -> dict[int, tuple[list[int], list[str]]]:
    """One job per size running its variants one after the other (a new parallelize() each, in the same
    processes): ranks -> (exit codes, logs). Two starts of 2 and 3 processes instead of six jobs."""
    jobs = {}
    for ranks, variants in PS_JOBS.items():
        out = tmp_path_factory.mktemp(f"ps{ranks}")
        codes = run_ranks([sys.executable, WORKER, "ps", ",".join(variants)], ranks, out, timeout=150)
        jobs[ranks] = (codes, _logs(out, ranks))
    return jobs


@pytest.mark.timeout(330)
@pytest.mark.parametrize("variant", [variant for variants in PS_JOBS.values() for variant in variants])
def test_parameter_server_variants_through_parallelize(ps_jobs, variant):
    """Rank 0 serves (ps; async EASGD's centre) and exits 0 inside parallelize(); the other ranks train, the
    loss falls; loading such an optimizer state (which cannot carry the server's state) is refused."""
    ranks = next(size for size, variants in PS_JOBS.items() if variant in variants)
    codes, logs = ps_jobs[ranks]
    assert codes == [0] * ranks, logs
    # the server's life ended inside parallelize(): SystemExit(0) there, nothing of the user's loop after it
    served = [f"SERVER ps {name}: exited 0 inside parallelize" for name in PS_JOBS[ranks]]
    assert logs[0].splitlines() == served, logs
    for rank in range(1, ranks):
        assert f"OK ps {variant}: rank {rank} loss" in logs[rank], logs
        assert f"OK ps {variant}: loading a ps state is refused" in logs[rank], logs
        assert "SERVER" not in logs[rank], logs


@pytest.mark.timeout(90)
def test_plain_python_runs_one_process_and_ps_names_torchrun():
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, WORKER, "alone"], env=env, capture_output=True, text=True, timeout=75
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for strategy in ("sync", "local-sgd"):
        assert f"OK {strategy}: equals plain SGD" in done.stdout, done.stdout
    assert "OK easgd: one process" in done.stdout, done.stdout
    assert "OK ps under plain python" in done.stdout and "torchrun" in done.stdout, done.stdout


@pytest.mark.parametrize("strategy", ["sync", "ps", "local-sgd", "easgd"])
def test_unknown_keyword_names_the_options_of_the_command_line(strategy):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as error:
        distlearn.parallelize(model, optimizer, strategy, bucket_megabytes=1)
    fields = [f.name for f in dataclasses.fields(strategy_class(strategy).Options)]
    assert "bucket_megabytes" in str(error.value)
    assert all(name in str(error.value) for name in fields), str(error.value)
    assert not (dist.is_available() and dist.is_initialized())  # refused before joining anything


def test_every_option_name_of_the_command_line_is_a_keyword():
    """SyncOptions' fields are the ``distlearn train`` flags; parallelize takes each by that name."""
    from distlearn.parallel.sync import SyncOptions

    defaults = {f.name: getattr(SyncOptions(), f.name) for f in dataclasses.fields(SyncOptions)}
    defaults.update(reducer="ring", bucket_mb=0.00001, compression="none")
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = distlearn.parallelize(model, optimizer, "sync", **defaults)
    try:
        strategy = optimizer.distlearn_strategy
        assert strategy.options == SyncOptions(**defaults)
        assert len(strategy.bucketer.buckets) == 4
    finally:
        optimizer.distlearn_strategy.close()
    assert not dist.is_initialized()
