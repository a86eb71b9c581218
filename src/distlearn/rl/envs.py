"""The environments of distributed RL: gymnasium environments, seeded, stepped together.

* :func:`make_env`: a gymnasium environment with discrete actions (CartPole-v1, Acrobot-v1, MinAtar's
  ``MinAtar/Breakout-v1`` ... when ``minatar`` is installed, Atari's ``ALE/Pong-v5`` ... when ``ale-py`` is:
  84x84 grayscale frames, 4 stacked, :class:`AtariFrames`), reset with its seed.
* :class:`EnvPool`: ``num_envs`` of them stepped together, each seeded by its global index, reset in place
  when an episode ends, with the returns of finished episodes collected.
* :func:`solved_threshold`: the return at which an environment counts as solved.

Convention for ``dones``: ``dones[t] = 1`` when the episode ended with step ``t`` (terminated or truncated),
so nothing after ``t`` is discounted into ``t``. Where we differ from the papers: a time-limit truncation
(CartPole's 500 steps) is treated like a termination, as CleanRL does; bootstrapping from the truncated
state would be slightly more correct and matters little on CartPole.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import numpy as np
import torch

from distlearn.errors import ConfigError, require_extra

__all__ = ["AtariFrames", "EnvPool", "make_env", "solved_threshold"]


def _gymnasium():
    gymnasium = require_extra("gymnasium", "rl", "distlearn rl")
    if "MinAtar" not in " ".join(gymnasium.registry):
        with contextlib.suppress(ImportError):  # the optional extra `distlearn[rl]`: MinAtar/Breakout-v1 ...
            from minatar.gym import register_envs

            register_envs()
    return gymnasium


def make_env(env_id: str, seed: int, *, render_mode: str | None = None) -> Any:
    """A gymnasium environment ``env_id`` with discrete actions, reset with ``seed``.

    Atari games (``ALE/...``, with ``ale-py``) come as :class:`AtariFrames`. Raises :class:`ConfigError` for
    an unknown id or a continuous action space.
    """
    gymnasium = _gymnasium()
    if env_id.startswith("ALE/") and env_id not in gymnasium.registry:
        with contextlib.suppress(ImportError):  # the optional extra `distlearn[atari]`
            import ale_py

            gymnasium.register_envs(ale_py)
    if env_id not in gymnasium.registry:
        hint = ""
        if env_id.startswith("MinAtar"):
            hint = " (MinAtar games need `pip install 'distlearn[rl]'`)"
        elif env_id.startswith("ALE/"):
            hint = " (Atari games need `pip install 'distlearn[atari]'`)"
        raise ConfigError(f"unknown environment {env_id!r}{hint}; try --env CartPole-v1 or Acrobot-v1")
    if env_id.startswith("ALE/"):  # v5: 4 frames per action, sticky actions 0.25 (Machado et al. 2018)
        env = AtariFrames(gymnasium.make(env_id, obs_type="grayscale", render_mode=render_mode))
    else:
        env = gymnasium.make(env_id, render_mode=render_mode)
    if not isinstance(env.action_space, gymnasium.spaces.Discrete):
        env.close()
        raise ConfigError(f"{env_id} has {env.action_space} actions; distlearn rl needs discrete actions")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


class AtariFrames:
    """An Atari game as the DQN papers feed it (Mnih et al. 2015): the screen in grayscale, downsampled to
    84 x 84 in [0, 1], the last 4 frames stacked as channels (``[84, 84, 4]``, channels last like MinAtar).

    Where we differ: the downsampling is torch's area interpolation (no OpenCV dependency), and there is no
    max over the last two raw frames (ALE v5's sticky actions and frame skip 4 are kept as they are).
    """

    def __init__(self, env: Any, size: int = 84, stack: int = 4) -> None:
        import gymnasium

        self.env, self.size = env, size
        self.frames: deque[np.ndarray] = deque(maxlen=stack)
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (size, size, stack), np.float32)
        self.action_space = env.action_space

    def _frame(self, screen: np.ndarray) -> np.ndarray:
        image = torch.as_tensor(np.asarray(screen), dtype=torch.float32)[None, None] / 255.0
        return torch.nn.functional.interpolate(image, size=(self.size, self.size), mode="area")[0, 0].numpy()

    def _stacked(self) -> np.ndarray:
        return np.stack(self.frames, axis=-1)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        screen, info = self.env.reset(**kwargs)
        frame = self._frame(screen)
        for _ in range(self.frames.maxlen or 1):
            self.frames.append(frame)
        return self._stacked(), info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        screen, reward, terminated, truncated, info = self.env.step(action)
        self.frames.append(self._frame(screen))
        return self._stacked(), reward, terminated, truncated, info

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


def solved_threshold(env_id: str) -> float | None:
    """The return at which ``env_id`` counts as solved (gymnasium's ``reward_threshold``), if it has one."""
    spec = _gymnasium().spec(env_id)
    return None if spec.reward_threshold is None else float(spec.reward_threshold)


class EnvPool:
    """``num_envs`` copies of ``env_id`` stepped together; an environment whose episode ends is reset.

    Environment ``i`` of this pool has the global index ``first_index + i`` and is seeded with
    ``seed + first_index + i``, so the same global environment behaves the same in whichever process runs it.

    Attributes:
        obs: current observations, float32 ``[num_envs, obs_dim]`` (image observations are flattened;
            ``image_shape`` is their ``(height, width, channels)``, None for vector observations).
        finished_returns: returns of the episodes that ended in the last :meth:`step`.
        terminated: float32 ``[num_envs]``, 1 where the last step ended its episode in a terminal state (not
            by a time limit); ``dones`` from :meth:`step` counts both.
        final_obs: ``[num_envs, obs_dim]``, the observation each environment reached in the last step, before
            an ended episode's reset (``obs`` holds the next episode's first state there).
    """

    def __init__(self, env_id: str, num_envs: int, seed: int, *, first_index: int = 0) -> None:
        if num_envs < 1:
            raise ConfigError(f"need at least one environment per worker, got --num-envs {num_envs}")
        self.env_id = env_id
        self.envs = [make_env(env_id, seed + first_index + i) for i in range(num_envs)]
        shape = tuple(int(n) for n in self.envs[0].observation_space.shape)
        self.obs_dim = int(np.prod(shape))
        # MinAtar's observations are images [height, width, channels]; the models see them flattened and
        # unflatten them for a convolution (image_shape), the vector states of classic control have None
        self.image_shape = shape if len(shape) == 3 else None
        self.num_actions = int(self.envs[0].action_space.n)
        first = [env.reset(seed=seed + first_index + i)[0] for i, env in enumerate(self.envs)]
        self.obs = torch.as_tensor(np.stack([np.asarray(o, np.float32).reshape(-1) for o in first]))
        self._returns = np.zeros(num_envs)
        self.finished_returns: list[float] = []
        self.terminated = torch.zeros(num_envs)
        self.final_obs = self.obs.clone()

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take ``actions`` ``[num_envs]``; return ``(next_obs, rewards, dones)`` as float32 tensors."""
        observations, rewards, dones = (
            [],
            np.zeros(self.num_envs, np.float32),
            np.zeros(self.num_envs, np.float32),
        )
        self.finished_returns = []
        terminal, finals = np.zeros(self.num_envs, np.float32), []
        for i, (env, action) in enumerate(zip(self.envs, actions.tolist(), strict=True)):
            observation, reward, terminated, truncated, _ = env.step(int(action))
            rewards[i] = reward
            terminal[i] = float(terminated)
            self._returns[i] += reward
            finals.append(np.asarray(observation, np.float32).reshape(-1))
            if terminated or truncated:
                dones[i] = 1.0
                self.finished_returns.append(float(self._returns[i]))
                self._returns[i] = 0.0
                observation, _ = env.reset()
            observations.append(np.asarray(observation, np.float32).reshape(-1))
        self.obs = torch.as_tensor(np.stack(observations))
        self.terminated, self.final_obs = torch.from_numpy(terminal), torch.as_tensor(np.stack(finals))
        return self.obs, torch.from_numpy(rewards), torch.from_numpy(dones)

    def reset_all(self, seeds: list[int]) -> None:
        """Reset every environment, ``i`` with ``seeds[i]``; episodes under way end uncounted."""
        first = [env.reset(seed=int(s))[0] for env, s in zip(self.envs, seeds, strict=True)]
        self.obs = torch.as_tensor(np.stack([np.asarray(o, np.float32).reshape(-1) for o in first]))
        self._returns[:] = 0.0
        self.finished_returns = []
        self.terminated = torch.zeros(self.num_envs)
        self.final_obs = self.obs.clone()

    def close(self) -> None:
        for env in self.envs:
            env.close()
