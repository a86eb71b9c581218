"""What every distributed RL algorithm here shares, written once: environments, models, returns, metrics.

* :func:`make_env` / :class:`EnvPool`: gymnasium environments (CartPole-v1, Acrobot-v1, MinAtar's
  ``MinAtar/Breakout-v1`` ... when ``minatar`` is installed, Atari's ``ALE/Pong-v5`` ... when ``ale-py`` is:
  84x84 grayscale frames, 4 stacked, :class:`AtariFrames`), each seeded, stepped together, reset in place
  when an episode ends, with the returns of finished episodes collected.
* :class:`ActorCritic` (policy ``pi(a|s)`` and value ``V(s)``, two tanh MLPs as in CleanRL's PPO) and
  :class:`QNetwork` (``Q(s, .)`` for DQN/Gorila).
* :func:`sample_actions`: inverse-CDF sampling with one random generator per environment, so the actions
  of environment ``g`` do not depend on how the environments are split among processes (this is what
  makes "R workers equal one process with R times the rollouts" exact).
* :func:`n_step_returns` (A3C's ``R_t = r_t + gamma R_{t+1}``, bootstrapped from ``V(s_{t+n})``) and
  :func:`gae` (Schulman et al. 2016, ``A_t = delta_t + gamma lambda A_{t+1}``).
* :func:`policy_gradient_loss`: the A2C/A3C loss and PPO's clipped surrogate.
* :class:`EpisodeStats` (the solved test: mean return over the last 100 episodes), :class:`RLMetrics`
  (the same JSON-lines records as every distlearn run) and :func:`save_policy` / :func:`load_policy`.

Convention for ``dones``: ``dones[t] = 1`` when the episode ended with step ``t`` (terminated or truncated),
so nothing after ``t`` is discounted into ``t``. Where we differ from the papers: a time-limit truncation
(CartPole's 500 steps) is treated like a termination, as CleanRL does; bootstrapping from the truncated
state would be slightly more correct and matters little on CartPole.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distlearn.errors import CheckpointError, ConfigError
from distlearn.metrics import MetricRecord, MetricsWriter

__all__ = [
    "SOLVED_WINDOW",
    "ActorCritic",
    "EnvPool",
    "EpisodeStats",
    "QNetwork",
    "RLMetrics",
    "Rollout",
    "flat_parameters",
    "gae",
    "pg_update",
    "collect_rollout",
    "env_generators",
    "load_flat_parameters",
    "load_policy",
    "make_env",
    "n_step_returns",
    "policy_gradient_loss",
    "sample_actions",
    "save_policy",
    "solved_threshold",
]

SOLVED_WINDOW = 100
"""Episodes averaged for the solved test (gymnasium's CartPole-v1: mean return >= 475 over 100 episodes)."""


# ---- environments ---------------------------------------------------------------------------------------


def _gymnasium():
    try:
        import gymnasium
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ConfigError("distlearn rl needs gymnasium: pip install gymnasium") from error
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
            hint = " (MinAtar games need `pip install minatar`)"
        elif env_id.startswith("ALE/"):
            hint = " (Atari games need `pip install ale-py`)"
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

    def close(self) -> None:
        for env in self.envs:
            env.close()


# ---- models ---------------------------------------------------------------------------------------------


def _layer(inputs: int, outputs: int, gain: float = math.sqrt(2)) -> nn.Linear:
    layer = nn.Linear(inputs, outputs)
    nn.init.orthogonal_(layer.weight, gain)  # orthogonal init, as in the PPO/A3C baselines
    nn.init.zeros_(layer.bias)
    return layer


class ImageInput(nn.Module):
    """Flat observations ``[B, H W C]`` back to images ``[B, C, H, W]`` for a convolution."""

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], *self.image_shape).permute(0, 3, 1, 2)


def _torso(obs_dim: int, image_shape: tuple[int, int, int] | None, hidden: int, activation: type) -> list:
    """First layers: ``Linear(obs_dim, hidden)`` for vector states; for small images, MinAtar's network
    (Young and Tian 2019): one 3x3 convolution with 16 filters, stride 1, ReLU, then ``Linear(., hidden)``;
    for Atari-sized images (32 pixels or more) the Nature DQN's three convolutions (Mnih et al. 2015:
    32 8x8 stride 4, 64 4x4 stride 2, 64 3x3 stride 1, ReLUs), then ``Linear(., hidden)``."""
    if image_shape is None:
        return [_layer(obs_dim, hidden), activation()]
    height, width, channels = image_shape
    if min(height, width) >= 32:
        convs = [nn.Conv2d(channels, 32, 8, stride=4), nn.Conv2d(32, 64, 4, stride=2), nn.Conv2d(64, 64, 3)]
        layers: list[nn.Module] = [ImageInput(image_shape)]
        for conv in convs:
            nn.init.orthogonal_(conv.weight, math.sqrt(2))
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
        with torch.no_grad():
            flat = nn.Sequential(*layers)(torch.zeros(1, obs_dim)).numel()
        return [*layers, nn.Flatten(), _layer(flat, hidden), activation()]
    conv = nn.Conv2d(channels, 16, kernel_size=3, stride=1)
    nn.init.orthogonal_(conv.weight, math.sqrt(2))
    nn.init.zeros_(conv.bias)
    flat = 16 * (height - 2) * (width - 2)
    return [ImageInput(image_shape), conv, nn.ReLU(), nn.Flatten(), _layer(flat, hidden), activation()]


class ActorCritic(nn.Module):
    """Policy ``pi(a|s; theta)`` and value ``V(s; theta_v)``: two MLPs (tanh), no shared layers.

    Sizes as CleanRL's PPO for classic control: ``hidden=64``, two hidden layers each. The policy's last
    layer starts near zero (gain 0.01), so the first policy is almost uniform. With ``image_shape``
    (MinAtar) each of the two starts with MinAtar's small convolution (see :func:`_torso`).
    """

    kind = "actor-critic"

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden: int = 64,
        *,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim, self.num_actions, self.hidden = obs_dim, num_actions, hidden
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.critic = nn.Sequential(
            *_torso(obs_dim, self.image_shape, hidden, nn.Tanh),
            _layer(hidden, hidden),
            nn.Tanh(),
            _layer(hidden, 1, 1.0),
        )
        self.actor = nn.Sequential(
            *_torso(obs_dim, self.image_shape, hidden, nn.Tanh),
            _layer(hidden, hidden),
            nn.Tanh(),
            _layer(hidden, num_actions, 0.01),
        )

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits ``[B, A]`` and values ``[B]``."""
        return self.actor(obs), self.critic(obs).squeeze(-1)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The most probable action (for ``distlearn rl play``)."""
        return self.actor(obs).argmax(-1)


class QNetwork(nn.Module):
    """Action values ``Q(s, a; theta)`` for every action: an MLP (ReLU), DQN's network for vector states;
    with ``image_shape`` (MinAtar) MinAtar's DQN network: one 16-filter 3x3 convolution, then the MLP."""

    kind = "q"

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden: int = 128,
        *,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim, self.num_actions, self.hidden = obs_dim, num_actions, hidden
        self.image_shape = None if image_shape is None else tuple(image_shape)
        first = (
            [nn.Linear(obs_dim, hidden), nn.ReLU()]
            if self.image_shape is None
            else _torso(obs_dim, self.image_shape, hidden, nn.ReLU)
        )
        self.net = nn.Sequential(
            *first,
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_actions),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The greedy action ``argmax_a Q(s, a)``."""
        return self.net(obs).argmax(-1)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` in one flat float32 vector (a copy), for sending."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a vector made by :func:`flat_parameters` back into ``model``."""
    torch.nn.utils.vector_to_parameters(flat, list(model.parameters()))


def sample_actions(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Sample ``a_i ~ softmax(logits_i)`` for each row ``i`` with row ``i``'s own generator (inverse CDF).

    One uniform draw per environment from that environment's generator: the action of an environment
    depends only on its own seed and its own logits, not on the other environments in the batch.
    """
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators])
    cdf = torch.softmax(logits.detach(), -1).cumsum(-1)
    actions = torch.searchsorted(cdf, uniforms.unsqueeze(-1)).squeeze(-1)
    return actions.clamp_(max=logits.shape[-1] - 1)  # guards against cdf[-1] = 1 - 1e-7 < u


def env_generators(seed: int, first_index: int, count: int) -> list[torch.Generator]:
    """One action-sampling generator per environment, seeded by the environment's global index."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + first_index + i) for i in range(count)]


# ---- returns and advantages -----------------------------------------------------------------------------


def n_step_returns(
    rewards: torch.Tensor, dones: torch.Tensor, bootstrap_value: torch.Tensor, gamma: float
) -> torch.Tensor:
    """A3C's n-step returns: ``R_t = r_t + gamma (1 - done_t) R_{t+1}``, ``R_T = V(s_T)`` (Mnih et al. 2016).

    ``rewards`` and ``dones`` are ``[T, ...]``; ``bootstrap_value`` is ``V(s_T)`` of the state after the
    last step, shape ``[...]``. The step ``t`` return sums ``gamma^k r_{t+k}`` up to the episode's end or
    the rollout's end, where ``gamma^{T-t} V(s_T)`` closes it.
    """
    returns = torch.zeros_like(rewards)
    running = bootstrap_value
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * (1.0 - dones[t]) * running
        returns[t] = running
    return returns


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    bootstrap_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016); returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma (1 - done_t) V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma lambda (1 - done_t)
    A_{t+1}`` and the value targets ``A_t + V(s_t)``. ``lam = 1`` gives the n-step returns minus ``V``;
    ``lam = 0`` the one-step TD error.
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(bootstrap_value)
    next_value = bootstrap_value
    for t in reversed(range(rewards.shape[0])):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * not_done * next_value - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


@dataclass
class Rollout:
    """``T`` steps of ``N`` environments: ``obs [T, N, obs_dim]``, ``next_obs [N, obs_dim]``.

    Every other field is ``[T, N]``.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    next_obs: torch.Tensor

    @classmethod
    def empty(cls, steps: int, num_envs: int, obs_dim: int) -> Rollout:
        zeros = torch.zeros(steps, num_envs)
        return cls(
            obs=torch.zeros(steps, num_envs, obs_dim),
            actions=zeros.clone(),
            log_probs=zeros.clone(),
            values=zeros.clone(),
            rewards=zeros.clone(),
            dones=zeros.clone(),
            next_obs=torch.zeros(num_envs, obs_dim),
        )

    def flat(self) -> torch.Tensor:
        """Everything in one float32 vector (to send); :meth:`unflat` is its inverse."""
        parts = [self.obs, self.actions, self.log_probs, self.values, self.rewards, self.dones, self.next_obs]
        return torch.cat([p.reshape(-1) for p in parts])

    @classmethod
    def unflat(cls, flat: torch.Tensor, steps: int, num_envs: int, obs_dim: int) -> Rollout:
        sizes = [steps * num_envs * obs_dim] + [steps * num_envs] * 5 + [num_envs * obs_dim]
        obs, actions, log_probs, values, rewards, dones, next_obs = torch.split(flat, sizes)
        shape = (steps, num_envs)
        return cls(
            obs.reshape(steps, num_envs, obs_dim),
            actions.reshape(shape),
            log_probs.reshape(shape),
            values.reshape(shape),
            rewards.reshape(shape),
            dones.reshape(shape),
            next_obs.reshape(num_envs, obs_dim),
        )

    @staticmethod
    def concat(rollouts: Sequence[Rollout]) -> Rollout:
        """The rollouts of several workers side by side (environments concatenated)."""
        return Rollout(
            *[
                torch.cat([getattr(r, name) for r in rollouts], dim=1 if name != "next_obs" else 0)
                for name in ("obs", "actions", "log_probs", "values", "rewards", "dones", "next_obs")
            ]
        )


def collect_rollout(
    model: ActorCritic, envs: EnvPool, steps: int, generators: Sequence[torch.Generator], stats: EpisodeStats
) -> Rollout:
    """Run the policy ``model`` for ``steps`` steps in every environment of ``envs``."""
    rollout = Rollout.empty(steps, envs.num_envs, envs.obs_dim)
    with torch.no_grad():
        for t in range(steps):
            obs = envs.obs
            logits, values = model(obs)
            actions = sample_actions(logits, generators)
            rollout.obs[t] = obs
            rollout.actions[t] = actions
            rollout.log_probs[t] = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
            rollout.values[t] = values
            _, rewards, dones = envs.step(actions)
            rollout.rewards[t], rollout.dones[t] = rewards, dones
            stats.add(envs.finished_returns, envs.num_envs)
    rollout.next_obs = envs.obs.clone()
    return rollout


def policy_gradient_loss(
    model: ActorCritic,
    obs: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    clip: float = 0.2,
    value_coef: float = 0.5,
    entropy_coef: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The actor-critic loss, averaged over the batch; PPO's clipped surrogate given ``old_log_probs``.

    A2C/A3C (Mnih et al. 2016): ``L = -log pi(a_t|s_t) A_t + c_v (R_t - V(s_t))^2 / 2 - beta H(pi(.|s_t))``.
    PPO (Schulman et al. 2017): the first term becomes ``-min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)``
    with ``rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)``.
    """
    logits, values = model(obs)
    log_probs_all = torch.log_softmax(logits, -1)
    log_probs = log_probs_all.gather(-1, actions.long()[:, None]).squeeze(-1)
    entropy = -(log_probs_all.exp() * log_probs_all).sum(-1).mean()
    if old_log_probs is None:
        policy_loss = -(log_probs * advantages).mean()
    else:
        ratio = (log_probs - old_log_probs).exp()
        policy_loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
    value_loss = 0.5 * (returns - values).pow(2).mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
    info = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}
    return loss, info


# ---- statistics, metrics, policies ----------------------------------------------------------------------


class EpisodeStats:
    """Returns of finished episodes and environment steps; the solved test over the last 100 episodes."""

    def __init__(self, threshold: float | None = None, window: int = SOLVED_WINDOW) -> None:
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=window)
        self.episodes = 0
        self.env_steps = 0
        self.solved_at: tuple[int, float] | None = None  # (env steps, seconds) when first solved
        self.start = time.perf_counter()

    def add(self, returns: Sequence[float], steps: int = 0) -> None:
        self.env_steps += steps
        for value in returns:
            self.recent.append(float(value))
            self.episodes += 1
            if self.solved_at is None and self.solved:
                self.solved_at = (self.env_steps, time.perf_counter() - self.start)

    @property
    def mean_return(self) -> float | None:
        return float(np.mean(self.recent)) if self.recent else None

    @property
    def solved(self) -> bool:
        return (
            self.threshold is not None
            and len(self.recent) == self.recent.maxlen
            and float(np.mean(self.recent)) >= self.threshold
        )


class RLMetrics:
    """Writes RL progress as distlearn :class:`MetricRecord` s (one JSON-lines format for every run).

    ``step`` counts updates; ``samples_per_s`` is environment steps per second; ``extra`` carries
    ``episode_return`` (mean of the last 100 episodes), ``episodes``, ``env_steps``, ``updates_per_s`` and
    the solved time. ``staleness`` is the mean over the window where the algorithm has any.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        role: str = "learner",
        algorithm: str = "",
        env_id: str = "",
        quiet: bool = False,
    ) -> None:
        self.writer = (
            MetricsWriter(run_dir, rank=rank, world_size=world_size, role=role, tensorboard="off")
            if run_dir is not None
            else None
        )
        self.algorithm, self.env_id, self.quiet = algorithm, env_id, quiet
        self.start = time.perf_counter()
        self._last = (self.start, 0, 0)
        self._staleness: list[float] = []

    def add_staleness(self, value: float) -> None:
        self._staleness.append(float(value))

    def log(
        self,
        updates: int,
        stats: EpisodeStats,
        *,
        kind: str = "train",
        lr: float | None = None,
        **extra: Any,
    ) -> MetricRecord:
        now = time.perf_counter()
        last_time, last_steps, last_updates = self._last
        elapsed = max(now - last_time, 1e-9)
        record = MetricRecord(
            kind=kind,  # type: ignore[arg-type]
            step=updates,
            epoch=0.0,
            wall_time=now - self.start,
            lr=lr,
            samples_per_s=(stats.env_steps - last_steps) / elapsed
            if kind != "summary"
            else stats.env_steps / max(now - self.start, 1e-9),
            staleness=float(np.mean(self._staleness)) if self._staleness else None,
            extra={
                "algorithm": self.algorithm,
                "env": self.env_id,
                "episode_return": stats.mean_return,
                "episodes": stats.episodes,
                "env_steps": stats.env_steps,
                "updates_per_s": (updates - last_updates) / elapsed
                if kind != "summary"
                else updates / max(now - self.start, 1e-9),
                "solved_env_steps": stats.solved_at[0] if stats.solved_at else None,
                "solved_seconds": stats.solved_at[1] if stats.solved_at else None,
                **extra,
            },
        )
        self._last = (now, stats.env_steps, updates)
        self._staleness = []
        if self.writer is not None:
            self.writer.write(record)
        if not self.quiet:
            mean = stats.mean_return
            print(
                f"[{self.algorithm}] {record.wall_time:7.1f}s updates {updates:6d} "
                f"env steps {stats.env_steps:8d} "
                f"return(100) {'-' if mean is None else f'{mean:7.1f}'} steps/s {record.samples_per_s:7.0f}"
                + (f" staleness {record.staleness:.2f}" if record.staleness is not None else ""),
                flush=True,
            )
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_policy(path: str | Path, model: ActorCritic | QNetwork, env_id: str, **info: Any) -> Path:
    """Save ``model``'s weights and what is needed to rebuild it (``weights_only``-loadable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": model.kind,
        "env_id": env_id,
        "obs_dim": model.obs_dim,
        "num_actions": model.num_actions,
        "hidden": model.hidden,
        "image_shape": list(model.image_shape) if model.image_shape is not None else None,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "info": info,
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def load_policy(path: str | Path) -> tuple[ActorCritic | QNetwork, str]:
    """Rebuild a policy saved by :func:`save_policy`; returns ``(model, env_id)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no policy at {path}; train one with `distlearn rl ppo ... --out DIR` first")
    try:
        payload = torch.load(path, weights_only=True)
        cls = {"actor-critic": ActorCritic, "q": QNetwork}[payload["kind"]]
        image_shape = payload.get("image_shape")  # absent in policies saved before MinAtar support
        model = cls(
            payload["obs_dim"],
            payload["num_actions"],
            payload["hidden"],
            image_shape=None if image_shape is None else tuple(image_shape),
        )
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a distlearn rl policy ({error}); pass the policy.pt of a run"
        ) from error
    model.eval()
    return model, str(payload["env_id"])


def pg_update(
    model: ActorCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: Any,
    generator: torch.Generator,
    *,
    allreduce_: Any = None,
    world_size: int = 1,
) -> dict[str, float]:
    """One A2C step or PPO's ``ppo_epochs x minibatches`` steps on ``rollout``; returns the last losses.

    ``allreduce_(tensor)`` (optional) sums a tensor over the replicas in place: the gradients (then divided by
    ``world_size``) and the advantage-normalisation sums, so R replicas with ``N`` environments each take
    exactly the steps of one process with ``R N`` environments. PPO's minibatches are sets of time steps
    (every environment's step ``t`` goes to the same minibatch; ``generator``, seeded alike on every replica,
    shuffles them), so each replica's share of a minibatch is the same size and the mean of the replicas'
    mean gradients is the gradient of the global minibatch mean.
    """
    steps, num_envs = rollout.rewards.shape
    with torch.no_grad():
        _, bootstrap = model(rollout.next_obs)
    advantages, returns = gae(
        rollout.rewards, rollout.values, rollout.dones, bootstrap, config.gamma, config.gae_lambda
    )
    params = [p for p in model.parameters()]
    if config.algo == "a2c":
        epochs, chunks = 1, [torch.arange(steps)]
    else:
        epochs = config.ppo_epochs
    info: dict[str, float] = {}
    for _ in range(epochs):
        if config.algo != "a2c":
            chunks = list(torch.randperm(steps, generator=generator).chunk(config.minibatches))
        for time_steps in chunks:
            obs = rollout.obs[time_steps].reshape(-1, rollout.obs.shape[-1])
            mb_advantages = advantages[time_steps].reshape(-1)
            if config.algo == "ppo":  # normalise with the global minibatch's mean and (unbiased) std
                sums = torch.stack(
                    [mb_advantages.sum(), mb_advantages.pow(2).sum(), torch.tensor(float(len(obs)))]
                )
                if allreduce_ is not None:
                    allreduce_(sums)
                total, squares, count = sums.tolist()
                mean = total / count
                std = math.sqrt(max(squares - count * mean * mean, 0.0) / max(count - 1, 1))
                mb_advantages = (mb_advantages - mean) / (std + 1e-8)
            loss, info = policy_gradient_loss(
                model,
                obs,
                rollout.actions[time_steps].reshape(-1),
                mb_advantages,
                returns[time_steps].reshape(-1),
                old_log_probs=rollout.log_probs[time_steps].reshape(-1) if config.algo == "ppo" else None,
                clip=config.clip,
                value_coef=config.value_coef,
                entropy_coef=config.entropy_coef,
            )
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if allreduce_ is not None and world_size > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                allreduce_(flat)
                flat /= world_size
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            if config.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
    return info
