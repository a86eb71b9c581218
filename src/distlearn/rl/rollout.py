"""Rollouts of a policy: actions sampled per environment, ``T`` steps of ``N`` environments stored.

* :func:`sample_actions`: inverse-CDF sampling with one random generator per environment
  (:func:`env_generators`), so the actions of environment ``g`` do not depend on how the environments are
  split among processes (this is what makes "R workers equal one process with R times the rollouts" exact).
* :class:`Rollout`: the tensors of ``T`` steps of ``N`` environments, flattened to one vector to send.
* :func:`collect_rollout`: run an :class:`~distlearn.rl.models.ActorCritic` in an
  :class:`~distlearn.rl.envs.EnvPool` for ``T`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distlearn.rl.envs import EnvPool
from distlearn.rl.metrics import EpisodeStats
from distlearn.rl.models import ActorCritic

__all__ = ["Rollout", "collect_rollout", "env_generators", "sample_actions"]


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
