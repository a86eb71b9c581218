"""--max-restarts: a sync worker killed once mid-run; torchrun restarts the job, which resumes by itself from
its newest checkpoint and ends with the weights of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from launch_jobs import Job, train_command

from distlearn.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from distlearn.errors import ConfigError
from distlearn.metrics import read_metrics
from distlearn.train import TrainConfig
from distlearn.train.launch import after_restart, check_restarts

DATA = Path("/usr/share/datasets/fashion-mnist")

# 200 steps of an MLP on 4096 Fashion-MNIST images, a checkpoint every 10 steps: a few seconds of training
FLAGS = [
    "--dataset", "fashion-mnist", "--model", "mlp", "--strategy", "sync", "--workers", "2",
    "--train-samples", "4096", "--test-samples", "500", "--batch-size", "128", "--steps", "200",
    "--checkpoint-every", "10", "--log-every", "10", "--tensorboard", "off", "--comm-timeout", "60",
]  # fmt: skip


def _run(out: Path, *flags: str, kill_rank: int | None = None) -> tuple[int, str, int | None]:
    """The job's exit code, its output, and the step of the checkpoint seen when ``kill_rank`` was killed."""
    job = Job(train_command(out, *FLAGS, *flags), out.parent / f"{out.name}.log")
    killed_after = None
    try:
        if kill_rank is not None:
            checkpoints = out / "checkpoints"
            job.wait_for(lambda: list_checkpoints(checkpoints), 400, "first checkpoint")
            victim = job.workers().get(kill_rank)
            assert victim is not None, f"rank {kill_rank} not found:\n{job.output()}"
            killed_after = int(latest_checkpoint(checkpoints).stem.split("-")[1])
            os.kill(victim, signal.SIGKILL)
        code = job.cli.wait(timeout=500)
        return code, job.output(), killed_after
    finally:
        job.close()


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not DATA.is_dir(), reason="Fashion-MNIST is not installed here")
def test_a_killed_sync_worker_restarts_and_ends_with_the_uninterrupted_weights(tmp_path):
    # the uninterrupted run trains beside the restarted one (its own job, ports and directory): the two
    # jobs' start-ups and rendezvous overlap instead of following each other
    uninterrupted = Job(train_command(tmp_path / "straight", *FLAGS), tmp_path / "straight.log")
    try:
        code, output, killed_after = _run(tmp_path / "restarted", "--max-restarts", "1", kill_rank=1)
        straight_code = uninterrupted.cli.wait(timeout=500)
        straight_output = uninterrupted.output()
    finally:
        uninterrupted.close()
    assert code == 0, output
    assert killed_after is not None and killed_after < 200
    records = read_metrics(tmp_path / "restarted")
    summary = [r for r in records if r.kind == "summary"]
    assert len(summary) == 1, output
    resumed_from = summary[0].extra["resumed_from_step"]
    assert resumed_from is not None and resumed_from >= killed_after, output  # it resumed, not started over
    assert f"restart 1 of 1: resuming from {tmp_path / 'restarted' / 'checkpoints'}" in output
    # the killed attempt's records past the checkpoint were cut: every train record's step appears once
    steps = [r.step for r in records if r.kind == "train"]
    assert steps == list(range(10, 201, 10)), steps

    assert straight_code == 0, straight_output
    restarted = load_checkpoint(latest_checkpoint(tmp_path / "restarted" / "checkpoints"))
    straight = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    assert restarted["position"]["step"] == straight["position"]["step"] == 200
    assert restarted["model"].keys() == straight["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(restarted["model"][key], value), key


def test_max_restarts_needs_a_torchrun_job(tmp_path):
    one = TrainConfig.build(max_restarts=1, out=str(tmp_path))
    with pytest.raises(ConfigError, match="of a torchrun job, and this run is one process"):
        check_restarts(one, 0)
    pool = TrainConfig.build(strategy="hogwild", workers=2, max_restarts=1, out=str(tmp_path))
    with pytest.raises(ConfigError, match="local process pool"):
        check_restarts(pool, 2)
    with pytest.raises(ConfigError, match="--max-restarts must be >= 0"):
        TrainConfig.build(max_restarts=-1)


def test_max_restarts_without_mid_epoch_checkpoints_warns(tmp_path, capsys):
    job = TrainConfig.build(strategy="sync", workers=2, max_restarts=2, out=str(tmp_path))
    check_restarts(job, 2)
    assert "resumes from the end of the last finished epoch" in capsys.readouterr().err
    check_restarts(TrainConfig.build(strategy="sync", workers=2, max_restarts=2, checkpoints=False), 2)
    assert "a restarted job starts over" in capsys.readouterr().err


@pytest.fixture
def restarted_worker(monkeypatch):
    """This process seen as a worker that torchrun restarted once (its environment, as torchrun sets it)."""
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1", TORCHELASTIC_RESTART_COUNT="1").items():  # fmt: skip
        monkeypatch.setenv(name, value)


def test_a_restarted_worker_resumes_from_the_newest_checkpoint_that_loads(tmp_path, restarted_worker, capsys):
    config = TrainConfig.build(strategy="sync", workers=2, out=str(tmp_path), max_restarts=1)
    assert after_restart(config).overwrite and after_restart(config).resume is None  # none yet: start over
    assert "no checkpoint in" in capsys.readouterr().err

    directory = tmp_path / "checkpoints"
    for step in (10, 20):
        save_checkpoint({"position": {"step": step}}, directory, step)
    (directory / "step-00000030.pt").write_bytes(b"cut off")  # the newest, but it does not load
    resumed = after_restart(config)
    assert resumed.resume == str(directory / "step-00000020.pt") and not resumed.overwrite
    assert f"restart 1 of 1: resuming from {directory / 'step-00000020.pt'}" in capsys.readouterr().err


def test_a_restart_without_checkpoints_continues_the_user_s_resume(tmp_path, restarted_worker):
    earlier = save_checkpoint({"position": {"step": 5}}, tmp_path / "elsewhere", 5)
    config = TrainConfig.build(out=str(tmp_path / "run"), resume=str(earlier))
    again = after_restart(config)
    assert again.resume == str(earlier) and not again.overwrite


def test_a_first_attempt_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    config = TrainConfig.build(out=str(tmp_path))
    assert after_restart(config) is config
