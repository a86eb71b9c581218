"""Returns and advantages over a rollout ``[T, ...]``: A3C's n-step returns and GAE.

Convention for ``dones``: ``dones[t] = 1`` when the episode ended with step ``t``, so nothing after ``t`` is
discounted into ``t`` (see :mod:`distlearn.rl.envs`).
"""

from __future__ import annotations

import torch

__all__ = ["gae", "n_step_returns"]


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
