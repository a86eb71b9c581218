"""Image observations (MinAtar, Atari) through the shared models; EnvPool's end-of-episode bookkeeping."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

from distlearn.rl.common import ActorCritic, EnvPool, ImageInput, QNetwork, load_policy, save_policy


def test_image_input_restores_channels_first_images_from_flat_observations():
    images = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).reshape(2, 5, 4, 3)  # [B, H, W, C]
    restored = ImageInput((5, 4, 3))(images.reshape(2, -1))
    assert torch.equal(restored, images.permute(0, 3, 1, 2))


@pytest.mark.parametrize("cls", [ActorCritic, QNetwork])
def test_image_models_run_on_flat_images_and_round_trip_through_save_and_load(cls, tmp_path):
    model = cls(10 * 10 * 4, 3, image_shape=(10, 10, 4))
    obs = torch.rand(7, 400)
    out = model(obs)
    assert (out[0] if isinstance(out, tuple) else out).shape == (7, 3)
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    save_policy(tmp_path / "policy.pt", model, "MinAtar/Breakout-v1")
    loaded, env_id = load_policy(tmp_path / "policy.pt")
    assert env_id == "MinAtar/Breakout-v1" and loaded.image_shape == (10, 10, 4)
    assert torch.equal(loaded.act(obs), model.act(obs))


def test_vector_models_have_no_convolution():
    assert not any(isinstance(m, torch.nn.Conv2d) for m in QNetwork(4, 2).modules())
    assert EnvPool("CartPole-v1", 1, 0).image_shape is None


def test_env_pool_tells_termination_from_time_limit_and_keeps_the_final_state():
    pool = EnvPool("CartPole-v1", 1, 0)
    pool.envs[0] = gymnasium.make("CartPole-v1", max_episode_steps=3)
    pool.obs = torch.as_tensor(pool.envs[0].reset(seed=0)[0]).reshape(1, -1)
    for _ in range(3):
        _, _, done = pool.step(torch.tensor([0]))
    # pushing left three times from the start does not fall: the episode ended by the time limit
    assert done[0] == 1 and pool.terminated[0] == 0
    assert not torch.equal(pool.final_obs[0], pool.obs[0])  # obs is the next episode's first state


def test_minatar_breakout_gives_image_observations():
    pytest.importorskip("minatar")
    pool = EnvPool("MinAtar/Breakout-v1", 2, 0)
    assert pool.image_shape == (10, 10, 4) and pool.obs.shape == (2, 400) and pool.num_actions == 3
    q = QNetwork(pool.obs_dim, pool.num_actions, image_shape=pool.image_shape)
    assert q(pool.obs).shape == (2, 3)


def test_atari_pong_gives_stacked_84x84_frames_and_the_nature_torso(tmp_path):
    pytest.importorskip("ale_py")
    pool = EnvPool("ALE/Pong-v5", 1, 0)
    assert pool.image_shape == (84, 84, 4) and pool.obs.shape == (1, 84 * 84 * 4) and pool.num_actions == 6
    frames = pool.obs.reshape(84, 84, 4)
    assert float(frames.min()) >= 0 and float(frames.max()) <= 1
    assert all(torch.equal(frames[..., 0], frames[..., c]) for c in range(4))  # reset: the frame 4 times
    for _ in range(20):
        pool.step(torch.tensor([0]))
    frames = pool.obs.reshape(84, 84, 4)
    assert not torch.equal(frames[..., 0], frames[..., 3])  # the stack moves: oldest first, newest last
    env = pool.envs[0]
    before = env._stacked()
    env.step(0)
    assert np.array_equal(env._stacked()[..., :3], before[..., 1:])  # one frame in, the oldest out
    model = QNetwork(pool.obs_dim, pool.num_actions, image_shape=pool.image_shape)
    assert [type(m).__name__ for m in model.net[:7]] == ["ImageInput", *["Conv2d", "ReLU"] * 3]
    assert model(pool.obs).shape == (1, 6)
    path = save_policy(tmp_path / "policy.pt", model, "ALE/Pong-v5")
    restored, _ = load_policy(path)
    assert torch.equal(restored(pool.obs), model(pool.obs))


def test_common_gathers_every_public_name_of_the_shared_modules():
    import importlib

    from distlearn.rl import common

    names = set()
    for concern in ("envs", "models", "rollout", "returns", "policy_gradient", "metrics"):
        module = importlib.import_module(f"distlearn.rl.{concern}")
        for name in module.__all__:
            assert getattr(common, name) is getattr(module, name), f"{concern}.{name}"
        names.update(module.__all__)
    assert set(common.__all__) == names
