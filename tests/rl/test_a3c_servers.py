"""A3C with the shared model on parameter-server ranks (``--servers S``): one worker equals the
shared-memory A3C with one worker; two workers share one model through the server and end by themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distlearn.errors import ConfigError
from distlearn.launch import launch_local
from distlearn.rl.a3c import run_a3c
from distlearn.rl.config import config_for, resolve

WORKER = str(Path(__file__).resolve().parent / "rl_worker.py")
COMMON = {
    "env": "CartPole-v1",
    "seed": 3,
    "num_envs": 2,
    "rollout_steps": 8,
    "total_steps": 2 * 8 * 25,  # 25 updates of 2 environments x t_max = 8
    "stop_when_solved": False,
    "quiet": True,
    "timeout": 30.0,
}


def _policy(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "policy.pt", weights_only=True)["state_dict"]


@pytest.mark.timeout(120)
def test_one_worker_on_a_server_equals_one_worker_on_shared_memory(tmp_path):
    run_a3c(config_for("a3c", COMMON, workers=1, out=str(tmp_path / "shared")))
    config = json.dumps({**COMMON, "workers": 1, "servers": 1, "out": str(tmp_path / "server")})
    assert launch_local([WORKER, "a3c", config], 2, module=False, timeout_s=100, threads_per_worker=1) == 0
    shared, server = _policy(tmp_path / "shared"), _policy(tmp_path / "server")
    for key in shared:  # same rollouts, gradients, annealed lr and RMSProp statistics, on the server
        torch.testing.assert_close(server[key], shared[key], rtol=0, atol=1e-6)
    served = json.loads((tmp_path / "server" / "ps-server0.json").read_text())
    assert served["version"] == 25 and all(tau == 0 for _, _, tau in served["updates"])


@pytest.mark.timeout(120)
def test_two_workers_share_the_server_model_and_end_by_themselves(tmp_path):
    config = json.dumps(
        {**COMMON, "workers": 2, "servers": 1, "total_steps": 2 * 2 * 8 * 20, "out": str(tmp_path)}
    )
    assert launch_local([WORKER, "a3c", config], 3, module=False, timeout_s=100, threads_per_worker=1) == 0
    served = json.loads((tmp_path / "ps-server0.json").read_text())
    workers = {worker for _, worker, _ in served["updates"]}
    assert workers == {1, 2}  # both actor-learners pushed into the one model
    assert served["version"] == len(served["updates"]) >= 40  # the step budget, shared by both
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["extra"]["env_steps"] >= 2 * 2 * 8 * 20
    assert (tmp_path / "policy.pt").is_file()


def test_servers_are_for_a3c_only():
    # --servers is now an option of a3c alone: another algorithm refuses it when the config is built
    with pytest.raises(ConfigError, match="--servers is an option of a3c, not of sync-pg"):
        config_for("sync-pg", servers=1)
    with pytest.raises(ConfigError, match="--servers"):
        resolve(config_for("a3c", servers=-1), "a3c")
    with pytest.raises(ConfigError, match="torchrun job"):
        run_a3c(config_for("a3c", servers=1, quiet=True))
