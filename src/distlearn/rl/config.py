"""One typed configuration for every ``distlearn rl`` algorithm; ``None`` means "the algorithm's default".

The defaults per algorithm (:data:`DEFAULTS`) are the ones measured in docs/rl.md on CartPole-v1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distlearn.errors import ConfigError

__all__ = ["ALGORITHMS", "DEFAULTS", "RLConfig", "resolve"]

ALGORITHMS = ("naive", "a3c", "gorila", "sync-pg")


def _f(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class RLConfig:
    """Settings of a distributed RL run (the fields become ``--options``)."""

    env: str = _f("CartPole-v1", "gymnasium id (CartPole-v1, Acrobot-v1, MinAtar/Breakout-v1 with minatar)")
    workers: int = _f(
        1, "R: rollout workers (naive), actor-learners (a3c), bundles (gorila), replicas (sync-pg)"
    )
    servers: int = _f(
        0, "a3c: 0 = shared memory on one machine; S >= 1 = theta and RMSProp on S parameter-server ranks"
    )
    seed: int = _f(1, "random seed; worker k's environments use seed + their global index")
    out: str | None = _f(None, "run directory: metrics.jsonl and policy.pt (default: runs/rl-<algorithm>)")
    total_steps: int | None = _f(None, "stop after this many environment steps (all workers together)")
    time_limit: float = _f(600.0, "stop after this many seconds of training")
    stop_when_solved: bool = _f(
        True, "stop when the mean return of the last 100 episodes reaches the threshold"
    )
    timeout: float = _f(60.0, "seconds any receive/collective may wait before the run fails (dead peers)")
    log_every: float = _f(2.0, "seconds between metric records")
    quiet: bool = _f(False, "no progress lines")
    # policy-gradient methods
    algo: str = _f("ppo", "sync-pg and naive: the update, ppo or a2c")
    num_envs: int | None = _f(None, "environments per worker")
    rollout_steps: int | None = _f(None, "steps per environment between updates (A3C: t_max)")
    lr: float | None = _f(None, "learning rate")
    gamma: float = _f(0.99, "discount gamma")
    gae_lambda: float | None = _f(None, "GAE lambda (1.0 = n-step returns)")
    ppo_epochs: int = _f(4, "PPO: passes over each batch")
    minibatches: int = _f(4, "PPO: minibatches per pass")
    clip: float = _f(0.2, "PPO: ratio clip epsilon")
    entropy_coef: float = _f(0.01, "entropy bonus beta")
    value_coef: float = _f(0.5, "value loss weight")
    max_grad_norm: float = _f(0.5, "gradient norm clip (0 = none)")
    anneal_lr: bool = _f(True, "decay the learning rate linearly to 0 over total_steps")
    reducer: str = _f(
        "ring", "sync-pg: allreduce algorithm (backend, ring, tree, rabenseifner, segmented-ring)"
    )
    # DQN / Gorila
    buffer_size: int = _f(100_000, "gorila: replay capacity per shard")
    batch_size: int = _f(128, "gorila: minibatch per learner update")
    learning_starts: int = _f(1_000, "gorila: transitions in a shard before its learner starts")
    target_every: int = _f(250, "gorila: parameter-server updates between target-network refreshes")
    train_every: int = _f(2, "gorila: actor steps per learner update")
    eps_start: float = _f(1.0, "gorila: initial epsilon")
    eps_end: float = _f(0.01, "gorila: final epsilon")
    eps_decay_steps: int = _f(10_000, "gorila: actor steps over which epsilon decays linearly")
    double_q: bool = _f(True, "gorila: double DQN targets (the online network picks the next action)")


DEFAULTS: dict[str, dict[str, Any]] = {
    "sync-pg": {
        "num_envs": 4,
        "rollout_steps": 128,
        "lr": 2.5e-3,
        "gae_lambda": 0.95,
        "total_steps": 200_000,
    },
    "naive": {"num_envs": 4, "rollout_steps": 128, "lr": 2.5e-3, "gae_lambda": 0.95, "total_steps": 200_000},
    "a3c": {"num_envs": 4, "rollout_steps": 10, "lr": 2e-3, "gae_lambda": 1.0, "total_steps": 300_000},
    "gorila": {"num_envs": 1, "rollout_steps": 1, "lr": 2.5e-4, "gae_lambda": 1.0, "total_steps": 400_000},
}


def resolve(config: RLConfig, algorithm: str) -> RLConfig:
    """``config`` with the algorithm's defaults filled in, validated (bad values raise ConfigError)."""
    if algorithm not in DEFAULTS:
        raise ConfigError(f"unknown RL algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    values = {k: v for k, v in DEFAULTS[algorithm].items() if getattr(config, k) is None}
    config = dataclasses.replace(config, **values)
    checks = [
        ("workers", config.workers >= 1, "use --workers 1 or more"),
        ("num_envs", config.num_envs >= 1, "use --num-envs 1 or more"),
        ("rollout_steps", config.rollout_steps >= 1, "use --rollout-steps 1 or more"),
        ("lr", config.lr > 0, "use e.g. --lr 1e-3"),
        ("gamma", 0 <= config.gamma <= 1, "use e.g. --gamma 0.99"),
        ("gae_lambda", 0 <= config.gae_lambda <= 1, "use e.g. --gae-lambda 0.95"),
        ("algo", config.algo in ("ppo", "a2c"), "use --algo ppo or --algo a2c"),
        (
            "minibatches",
            algorithm in ("a3c", "gorila")
            or (config.minibatches >= 1 and config.rollout_steps % config.minibatches == 0),
            "--minibatches must divide --rollout-steps (PPO splits the rollout's time steps)",
        ),
        ("timeout", config.timeout > 0, "use e.g. --timeout 60"),
        (
            "servers",
            config.servers >= 0 and (config.servers == 0 or algorithm == "a3c"),
            "--servers S >= 1 puts A3C's shared model on parameter-server ranks; the other algorithms "
            "take no --servers (Gorila always has one server rank)",
        ),
        ("total_steps", config.total_steps >= 1, "use e.g. --total-steps 200000"),
        (
            "batch_size",
            config.batch_size >= 1 and config.buffer_size >= config.batch_size,
            "--buffer-size must hold at least one --batch-size",
        ),
    ]
    for name, ok, fix in checks:
        if not ok:
            raise ConfigError(f"bad --{name.replace('_', '-')} {getattr(config, name)!r}: {fix}")
    return config
