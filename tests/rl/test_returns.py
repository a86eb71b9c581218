"""n-step returns and GAE against sums written out by hand, and the policy's sampling and saving."""

from __future__ import annotations

import pytest
import torch

from distlearn.errors import CheckpointError, ConfigError
from distlearn.rl.common import (
    ActorCritic,
    EnvPool,
    EpisodeStats,
    gae,
    load_policy,
    n_step_returns,
    sample_actions,
    save_policy,
)

GAMMA, LAM = 0.9, 0.8


def test_n_step_returns_by_hand():
    # one environment, T = 4, the episode ends after step 1, bootstrap V(s_4) = 10
    rewards = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    returns = n_step_returns(rewards, dones, torch.tensor([10.0]), GAMMA)
    g = GAMMA
    expected = [1 + g * 2, 2, 3 + g * 4 + g * g * 10, 4 + g * 10]
    torch.testing.assert_close(returns[:, 0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_gae_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0])[:, None]
    values = torch.tensor([0.5, 1.0, -1.0])[:, None]
    dones = torch.tensor([0.0, 0.0, 1.0])[:, None]
    bootstrap = torch.tensor([7.0])  # ignored: the episode ends at the last step
    advantages, returns = gae(rewards, values, dones, bootstrap, GAMMA, LAM)
    d0 = 1 + GAMMA * 1.0 - 0.5
    d1 = 0 + GAMMA * -1.0 - 1.0
    d2 = 2 - -1.0
    a2 = d2
    a1 = d1 + GAMMA * LAM * a2
    a0 = d0 + GAMMA * LAM * a1
    torch.testing.assert_close(advantages[:, 0], torch.tensor([a0, a1, a2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, advantages + values)


def test_gae_with_lambda_one_is_n_step_returns_minus_values():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 3, generator=generator)
    values = torch.randn(7, 3, generator=generator)
    dones = (torch.rand(7, 3, generator=generator) < 0.3).float()
    bootstrap = torch.randn(3, generator=generator)
    advantages, _ = gae(rewards, values, dones, bootstrap, GAMMA, 1.0)
    torch.testing.assert_close(advantages, n_step_returns(rewards, dones, bootstrap, GAMMA) - values)
    one_step, _ = gae(rewards, values, dones, bootstrap, GAMMA, 0.0)
    next_values = torch.cat([values[1:], bootstrap[None]])
    torch.testing.assert_close(one_step, rewards + GAMMA * (1 - dones) * next_values - values)


def test_sampled_actions_follow_the_policy_and_each_env_its_own_generator():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(20_000, 3)
    generators = [torch.Generator().manual_seed(i) for i in range(20_000)]
    frequencies = torch.bincount(sample_actions(logits, generators), minlength=3) / 20_000
    torch.testing.assert_close(frequencies, torch.tensor([0.2, 0.5, 0.3]), rtol=0, atol=0.015)
    # env 5's action does not depend on the other rows of the batch
    alone = sample_actions(logits[:1], [torch.Generator().manual_seed(5)])
    batch = sample_actions(logits[:8], [torch.Generator().manual_seed(i) for i in range(8)])
    assert alone.item() == batch[5].item()


def test_env_pool_counts_episodes_and_solved_window():
    envs = EnvPool("CartPole-v1", 2, seed=0)
    stats = EpisodeStats(threshold=5.0, window=3)
    for _ in range(200):
        envs.step(torch.zeros(2, dtype=torch.long))  # always push left: episodes of ~10 steps
        stats.add(envs.finished_returns, envs.num_envs)
    assert stats.env_steps == 400 and stats.episodes >= 3
    assert stats.solved and stats.solved_at is not None  # every such episode returns more than 5
    with pytest.raises(ConfigError, match="unknown environment"):
        EnvPool("NoSuchEnv-v0", 1, seed=0)


def test_policy_round_trip(tmp_path):
    model = ActorCritic(4, 2)
    save_policy(tmp_path / "policy.pt", model, "CartPole-v1")
    loaded, env_id = load_policy(tmp_path / "policy.pt")
    assert env_id == "CartPole-v1"
    obs = torch.randn(5, 4)
    torch.testing.assert_close(loaded(obs)[0], model(obs)[0], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no policy"):
        load_policy(tmp_path / "missing.pt")


def test_play_runs_a_policy_and_writes_a_gif(tmp_path):
    pytest.importorskip("pygame")
    from PIL import Image

    from distlearn.rl.play import play

    torch.manual_seed(0)
    save_policy(tmp_path / "policy.pt", ActorCritic(4, 2), "CartPole-v1")
    returns = play(tmp_path / "policy.pt", episodes=2, gif=tmp_path / "run.gif", max_frames=40)
    assert len(returns) == 2 and all(1 <= r <= 500 for r in returns)
    with Image.open(tmp_path / "run.gif") as image:
        assert image.n_frames == min(40, int(returns[0])) // 2 + (min(40, int(returns[0])) % 2)
