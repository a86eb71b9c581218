"""What every distributed RL algorithm here shares, written once, in one import.

The code lives in one module per concern; this module gathers their public names so an algorithm file
imports its shared parts from one place:

* :mod:`distlearn.rl.envs`: :func:`make_env`, :class:`AtariFrames`, :class:`EnvPool` (seeded gymnasium
  environments stepped together, reset in place), :func:`solved_threshold`.
* :mod:`distlearn.rl.models`: :class:`ActorCritic` (``pi(a|s)`` and ``V(s)``), :class:`QNetwork`
  (``Q(s, .)``), :class:`ImageInput`, :func:`flat_parameters` / :func:`load_flat_parameters`,
  :func:`save_policy` / :func:`load_policy`.
* :mod:`distlearn.rl.rollout`: :func:`sample_actions` and :func:`env_generators` (one generator per
  environment, so the split of environments among processes does not change the actions),
  :class:`Rollout`, :func:`collect_rollout`.
* :mod:`distlearn.rl.returns`: :func:`n_step_returns` (A3C) and :func:`gae` (Schulman et al. 2016).
* :mod:`distlearn.rl.policy_gradient`: :func:`policy_gradient_loss` (A2C/A3C loss, PPO's clipped
  surrogate) and :func:`pg_update`.
* :mod:`distlearn.rl.metrics`: :class:`EpisodeStats` (the solved test over :data:`SOLVED_WINDOW` episodes)
  and :class:`RLMetrics` (the JSON-lines records of every distlearn run); :func:`stats_state` /
  :func:`restore_stats` (episode statistics in a checkpoint).
"""

from __future__ import annotations

from distlearn.rl.envs import AtariFrames, EnvPool, make_env, solved_threshold
from distlearn.rl.metrics import SOLVED_WINDOW, EpisodeStats, RLMetrics, restore_stats, stats_state
from distlearn.rl.models import (
    ActorCritic,
    ImageInput,
    QNetwork,
    flat_parameters,
    load_flat_parameters,
    load_policy,
    save_policy,
)
from distlearn.rl.policy_gradient import pg_update, policy_gradient_loss
from distlearn.rl.returns import gae, n_step_returns
from distlearn.rl.rollout import Rollout, collect_rollout, env_generators, sample_actions

__all__ = [
    "SOLVED_WINDOW",
    "ActorCritic",
    "AtariFrames",
    "EnvPool",
    "EpisodeStats",
    "ImageInput",
    "QNetwork",
    "RLMetrics",
    "Rollout",
    "collect_rollout",
    "env_generators",
    "flat_parameters",
    "gae",
    "load_flat_parameters",
    "load_policy",
    "make_env",
    "n_step_returns",
    "pg_update",
    "policy_gradient_loss",
    "restore_stats",
    "sample_actions",
    "save_policy",
    "solved_threshold",
    "stats_state",
]
