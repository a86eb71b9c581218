"""Synchronous policy gradients: R replicas with N environments each equal one process with R N environments.

The overview's claim for the "HPC" way: the gradient allreduce makes R replicas one large-batch learner. Two
torchrun replicas (2 environments each) and one process (4 environments) train A2C and PPO for a few updates
from the same seed; the saved weights must agree to 1e-5, and must have moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distlearn.launch import launch_local
from distlearn.rl.common import ActorCritic
from distlearn.rl.config import config_for
from distlearn.rl.sync_pg import run_sync_pg

WORKER = str(Path(__file__).resolve().parent / "rl_worker.py")


def _config(out: Path, num_envs: int, algo: str, reducer: str = "ring") -> dict:
    return {
        "env": "CartPole-v1",
        "seed": 3,
        "out": str(out),
        "num_envs": num_envs,
        "rollout_steps": 16,
        "minibatches": 4,
        "ppo_epochs": 2,
        "total_steps": 4 * 16 * 4,
        "algo": algo,
        "reducer": reducer,
        "stop_when_solved": False,
        "timeout": 30.0,
        "quiet": True,
        "log_every": 0.0,
    }


def _weights(path: Path) -> torch.Tensor:
    state = torch.load(path / "policy.pt", weights_only=True)["state_dict"]
    return torch.cat([value.reshape(-1) for value in state.values()])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("algo", "reducer"),
    [("ppo", "ring"), ("a2c", "tree"), ("ppo", "auto")],  # auto: shm (one host, CPU)
)
def test_two_replicas_equal_one_process_with_twice_the_environments(tmp_path, algo, reducer):
    replicas = 2
    one = run_sync_pg(config_for("sync-pg", _config(tmp_path / "one", 2 * replicas, algo)))
    assert one["updates"] == 4
    code = launch_local(
        [WORKER, "sync-pg", json.dumps(_config(tmp_path / "two", 2, algo, reducer))],
        replicas,
        module=False,
        timeout_s=100,
        threads_per_worker=1,
    )
    assert code == 0, f"the {replicas}-replica job failed (exit {code}); its output is above"
    torch.manual_seed(3)
    start = torch.cat([p.detach().reshape(-1) for p in ActorCritic(4, 2).parameters()])
    single, distributed = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert (single - start).abs().max() > 1e-3, "training did not move the weights"
    difference = float((single - distributed).abs().max())
    assert difference < 1e-5, f"{algo}: max |difference| {difference:.2e}"
