"""Gorila's sharded replay memory: each actor's transitions stay in its own shard, first in first out, and
minibatches are drawn uniformly from what is stored (chi-square test against the uniform distribution)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from distlearn.errors import ConfigError
from distlearn.rl.gorila import ReplayShard


def _fill(shard: ReplayShard, actor: int, count: int) -> None:
    for i in range(count):  # transition i of actor k carries the id 1000 k + i in its reward
        shard.add(torch.full((3,), float(i)), i % 2, 1000.0 * actor + i, torch.full((3,), i + 1.0), 0.0)


def test_shards_hold_their_own_actors_transitions_only_and_all_of_them():
    shards = [ReplayShard(100, 3, seed=k) for k in range(3)]
    for k, shard in enumerate(shards):
        _fill(shard, k, 40 + k)
    stored = [set(shard.rewards[: len(shard)].tolist()) for shard in shards]
    for k, ids in enumerate(stored):
        assert ids == {1000.0 * k + i for i in range(40 + k)}  # every transition of actor k, nothing else
    assert not (stored[0] & stored[1]) and not (stored[1] & stored[2])  # shards are disjoint


def test_a_full_shard_keeps_the_last_capacity_transitions():
    shard = ReplayShard(10, 3)
    _fill(shard, 0, 27)
    assert len(shard) == 10 and shard.added == 27
    assert set(shard.rewards.tolist()) == {float(i) for i in range(17, 27)}
    ids = shard.rewards.long()  # the stored tuples are consistent: s' = s + 1, a = id mod 2
    torch.testing.assert_close(shard.next_obs[:, 0], shard.obs[:, 0] + 1)
    torch.testing.assert_close(shard.actions, ids % 2)


def test_sampling_is_uniform_over_the_stored_transitions_and_seeded():
    shard = ReplayShard(50, 3, seed=7)
    _fill(shard, 0, 30)  # 30 of 50 slots used: samples must never touch the empty ones
    draws = torch.cat([shard.sample_indices(64) for _ in range(300)])
    assert int(draws.max()) < 30 and int(draws.min()) >= 0
    counts = torch.bincount(draws, minlength=30).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    again = ReplayShard(50, 3, seed=7)
    _fill(again, 0, 30)
    assert torch.equal(again.sample_indices(64), draws[:64])  # the same seed draws the same minibatches
    obs, actions, rewards, next_obs, dones = shard.sample(16)
    assert obs.shape == (16, 3) and actions.dtype == torch.long
    torch.testing.assert_close(next_obs[:, 0], obs[:, 0] + 1)


def test_bad_replay_settings_are_rejected():
    with pytest.raises(ConfigError, match="capacity"):
        ReplayShard(0, 3)
    with pytest.raises(ConfigError, match="empty replay"):
        ReplayShard(5, 3).sample(2)


@pytest.mark.timeout(90)
def test_with_one_bundle_every_gradient_is_computed_on_the_newest_theta(tmp_path):
    """R = 1: the bundle reads the server's reply before it computes its next gradient, so no update lands
    between the weights a gradient was computed on and its own update (staleness exactly 0 everywhere)."""
    import json
    from pathlib import Path

    from distlearn.launch import launch_local

    worker = str(Path(__file__).resolve().parent / "rl_worker.py")
    config = {
        "env": "CartPole-v1",
        "out": str(tmp_path),
        "timeout": 20.0,
        "quiet": True,
        "learning_starts": 64,
        "batch_size": 16,
        "total_steps": 1500,
        "stop_when_solved": False,
        "log_every": 0.05,
    }
    code = launch_local(
        [worker, "gorila", json.dumps(config)], 2, module=False, timeout_s=80, threads_per_worker=1
    )
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    measured = [r["staleness"] for r in records if r["staleness"] is not None]
    assert measured and records[-1]["step"] > 100, records[-1]
    assert all(value == 0.0 for value in measured), measured
