"""Checkpoint and resume of the synchronous RL algorithms: a resumed run ends with the uninterrupted run's
weights (sync-pg in one process and as two replicas, naive), the metrics are cut back to the checkpoint, and
a checkpoint of another run is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distlearn.checkpoint import load_checkpoint
from distlearn.errors import ConfigError
from distlearn.launch import launch_local
from distlearn.metrics import read_metrics
from distlearn.rl.cli import run_algorithm
from distlearn.rl.config import config_for

WORKER = str(Path(__file__).resolve().parent / "rl_worker.py")
PG = {
    "env": "CartPole-v1",
    "seed": 4,
    "num_envs": 2,
    "rollout_steps": 8,
    "minibatches": 2,
    "ppo_epochs": 2,
    "total_steps": 2 * 8 * 6,  # 6 updates of one process
    "stop_when_solved": False,
    "quiet": True,
    "log_every": 0.0,
    "timeout": 30.0,
    "checkpoint_every": 2,
}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "policy.pt", weights_only=True)["state_dict"]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.timeout(60)
def test_sync_pg_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    full = tmp_path / "full"
    run_algorithm("sync-pg", config_for("sync-pg", PG, out=str(full)))
    checkpoint = full / "checkpoints" / "step-00000004.pt"
    assert checkpoint.is_file()  # the last two are kept: updates 4 and 6
    resumed = tmp_path / "resumed"
    summary = run_algorithm("sync-pg", config_for("sync-pg", PG, out=str(resumed), resume=str(checkpoint)))
    assert summary["updates"] == 6 and summary["resumed_from_update"] == 4
    _assert_equal(_weights(resumed), _weights(full))
    # the resumed run took the 2 updates after the checkpoint: its weights moved from the checkpoint's
    saved = load_checkpoint(checkpoint)["model"]  # (its checksum verified)
    assert any(not torch.equal(saved[k], v) for k, v in _weights(full).items())


@pytest.mark.timeout(60)
def test_resume_in_the_same_out_cuts_the_metrics_back_and_counts_only_this_run(tmp_path):
    out = tmp_path / "run"
    run_algorithm("sync-pg", config_for("sync-pg", PG, out=str(out)))
    first = read_metrics(out)
    run_algorithm(
        "sync-pg",
        config_for("sync-pg", PG, out=str(out), resume=str(out / "checkpoints" / "step-00000004.pt")),
    )
    records = read_metrics(out)
    train = [r.step for r in records if r.kind == "train"]
    assert train == [1, 2, 3, 4, 5, 6]  # one record per update: the killed run's 5 and 6 were cut
    assert [r.kind for r in records].count("summary") == 1
    assert all(r.loss is not None for r in records if r.kind == "train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_update"] == 4 and summary["updates"] == 6
    # samples/s of the summary counts this run's 2 updates (32 env steps), not the 96 since the start
    record = records[-1]
    assert record.extra["updates_per_s"] * record.samples_per_s > 0
    assert record.samples_per_s / record.extra["updates_per_s"] == pytest.approx(16.0)
    # the clock continues from the checkpoint's wall time
    assert records[4].wall_time >= first[3].wall_time


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    run_algorithm("sync-pg", config_for("sync-pg", {**PG, "total_steps": 2 * 8 * 2}, out=str(out)))
    other = config_for("sync-pg", {**PG, "total_steps": 2 * 8 * 2, "seed": 5}, out=str(tmp_path / "b"),
                       resume=str(out / "checkpoints"))  # fmt: skip
    with pytest.raises(ConfigError, match="--seed 4"):
        run_algorithm("sync-pg", other)


def test_gorila_and_a3c_on_servers_refuse_checkpoints_before_starting():
    from distlearn.rl.config import resolve

    with pytest.raises(ConfigError, match="gorila does not checkpoint or resume"):
        resolve(config_for("gorila", checkpoint_every=5), "gorila")
    with pytest.raises(ConfigError, match="a3c --servers does not checkpoint or resume"):
        resolve(config_for("a3c", servers=1, resume="runs/x"), "a3c")


@pytest.mark.timeout(90)
def test_a3c_resumes_its_weights_statistics_and_counters(tmp_path):
    """A3C on shared memory is asynchronous, so not bitwise: the resumed run continues the checkpoint's
    update and env-step counters and its metrics, and does only the rest of the step budget."""
    values = {
        "env": "CartPole-v1", "seed": 3, "workers": 1, "num_envs": 2, "rollout_steps": 8,
        "total_steps": 2 * 8 * 40, "stop_when_solved": False, "quiet": True, "log_every": 0.0,
        "checkpoint_every": 10,
    }  # fmt: skip
    out = tmp_path / "run"
    run_algorithm("a3c", config_for("a3c", values, out=str(out)))
    checkpoint = sorted((out / "checkpoints").glob("step-*.pt"))[0]
    saved = load_checkpoint(checkpoint)
    assert saved["updates"] >= 10 and saved["env_steps"] == 16 * saved["updates"]
    summary = run_algorithm("a3c", config_for("a3c", values, out=str(out), resume=str(checkpoint)))
    assert summary["resumed_from_update"] == saved["updates"]
    assert summary["env_steps"] >= values["total_steps"] and summary["updates"] >= 40
    records = read_metrics(out)
    steps = [r.step for r in records if r.kind == "train"]
    assert steps == sorted(steps) and steps[0] <= saved["updates"] < steps[-1]
    assert [r.kind for r in records].count("summary") == 1


@pytest.mark.timeout(120)
def test_two_sync_pg_replicas_resume_exactly(tmp_path):
    values = {**PG, "total_steps": 2 * 2 * 8 * 4}  # 4 updates of two replicas
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    job = [WORKER, "sync-pg", json.dumps({**values, "out": str(full)})]
    assert launch_local(job, 2, module=False, timeout_s=90, threads_per_worker=1) == 0
    checkpoint = str(full / "checkpoints" / "step-00000002.pt")
    job = [WORKER, "sync-pg", json.dumps({**values, "out": str(resumed), "resume": checkpoint})]
    assert launch_local(job, 2, module=False, timeout_s=90, threads_per_worker=1) == 0
    _assert_equal(_weights(resumed), _weights(full))


@pytest.mark.timeout(120)
def test_naive_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    values = {**PG, "workers": 2, "total_steps": 2 * 2 * 8 * 4}  # 4 updates of two rollout workers
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    job = [WORKER, "naive", json.dumps({**values, "out": str(full)})]
    assert launch_local(job, 3, module=False, timeout_s=90, threads_per_worker=1) == 0
    checkpoint = str(full / "checkpoints" / "step-00000002.pt")
    job = [WORKER, "naive", json.dumps({**values, "out": str(resumed), "resume": checkpoint})]
    assert launch_local(job, 3, module=False, timeout_s=90, threads_per_worker=1) == 0
    _assert_equal(_weights(resumed), _weights(full))
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_update"] == 2
