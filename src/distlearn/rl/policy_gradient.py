"""The policy-gradient losses and updates: A2C/A3C's actor-critic loss, PPO's clipped surrogate.

* :func:`policy_gradient_loss`: the loss of one batch.
* :func:`pg_update`: one A2C step or PPO's epochs of minibatch steps on a
  :class:`~distlearn.rl.rollout.Rollout`, with an optional allreduce so R replicas take exactly the steps of
  one process with R times the environments.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from distlearn.rl.models import ActorCritic
from distlearn.rl.returns import gae
from distlearn.rl.rollout import Rollout

__all__ = ["pg_update", "policy_gradient_loss"]


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
    info = {
        "loss": loss.item(),
        "policy_loss": policy_loss.item(),
        "value_loss": value_loss.item(),
        "entropy": entropy.item(),
    }
    return loss, info


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
    """One A2C step or PPO's ``ppo_epochs x minibatches`` steps on ``rollout``.

    Returns the last minibatch's losses, with ``loss`` the mean total loss over the update's minibatches.

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
    losses: list[float] = []
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
            losses.append(info["loss"])
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
    return {**info, "loss": sum(losses) / len(losses)}
