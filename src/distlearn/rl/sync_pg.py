"""Synchronous policy gradients, the "HPC" way: every worker rolls out, gradients are allreduced.

The overview's "HPC policy gradients" (as in OpenAI's and DeepMind's synchronous A2C/PPO): R replicas start
from the same weights (same seed), each runs ``N`` environments for ``T`` steps with its own copy of the
policy, computes the gradient of the loss on its ``T x N`` samples, and the gradients are summed with one of
distlearn's allreduce algorithms (:func:`distlearn.comm.reducers.create_reducer`) and divided by R. Every
replica then takes the identical optimizer step, so the weights never diverge and no parameter server is
needed.

Update (PPO, Schulman et al. 2017, per minibatch ``B`` of the global ``T x R N`` batch)::

    g = (1/R) sum_r grad_theta L_r(theta),   L = -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t)
                                                 + c_v (R_t - V(s_t))^2 / 2 - beta H(pi(.|s_t))
    theta <- Adam(theta, clip_norm(g))

with GAE advantages ``A_t`` (lambda 0.95). A2C (``--algo a2c``) is the same with one step per rollout and the
plain ``-log pi(a_t|s_t) A_t``. R replicas with N environments each equal one process with R N environments
(tests/rl/test_sync_pg.py, to 1e-5): the per-environment action generators and the time-step minibatches of
:func:`distlearn.rl.common.pg_update` make the data identical, and the allreduce makes the gradient identical.

Where we differ from CleanRL's ppo.py: minibatches are sets of time steps rather than of single samples (so
they split evenly over replicas), no value-loss clipping, and a 10x larger learning rate (2.5e-3, tuned on
CartPole-v1: it solves in about half the steps). Tuning: ``--lr`` first; more ``--num-envs`` per worker
for throughput; ``--rollout-steps`` 128 suits CartPole.

Run: ``distlearn rl sync-pg --env CartPole-v1 --workers 2`` (one machine), or under
``torchrun --nnodes 2 --nproc-per-node 2 ... -m distlearn rl sync-pg ...`` on two.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlearn.comm.reducers import create_reducer
from distlearn.comm.reducers.auto import resolve_reducer
from distlearn.launch import in_torchrun, init_distributed, shutdown
from distlearn.optim import Adam
from distlearn.rl.checkpointing import boundary_seed, cut_metrics, load_rl_checkpoint, save_rl_checkpoint
from distlearn.rl.common import (
    ActorCritic,
    EnvPool,
    EpisodeStats,
    RLMetrics,
    collect_rollout,
    env_generators,
    pg_update,
    restore_stats,
    save_policy,
    solved_threshold,
    stats_state,
)
from distlearn.rl.config import RLConfig, flat_values, resolve

__all__ = ["run_sync_pg"]


def run_sync_pg(config: RLConfig) -> dict[str, Any]:
    """Train with synchronous policy gradients; one call per replica (under torchrun) or one process.

    Returns a summary (env steps, updates, seconds, solved time, final mean return) on every replica; rank 0
    writes ``out/metrics.jsonl`` and ``out/policy.pt``.
    """
    config = resolve(config, "sync-pg")
    distributed = in_torchrun()
    rank, world_size = 0, 1
    if distributed:
        context = init_distributed(timeout_s=config.timeout)
        rank, world_size = context.rank, context.world_size
    out = Path(config.out or "runs/rl-sync-pg")
    try:
        return _train(config, rank, world_size, out)
    finally:
        if distributed:
            shutdown()


def _train(config: RLConfig, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    torch.set_num_threads(1)  # tiny networks: more threads only add contention (2 cores, R processes)
    torch.manual_seed(config.seed)  # the same initial weights on every replica
    first_env = rank * config.num_envs
    envs = EnvPool(config.env, config.num_envs, config.seed, first_index=first_env)
    generators = env_generators(config.seed, first_env, config.num_envs)
    minibatch_generator = torch.Generator().manual_seed(config.seed)  # same on every replica
    model = ActorCritic(envs.obs_dim, envs.num_actions, image_shape=envs.image_shape)
    # eps_hat=False is exactly torch.optim.Adam; eps 1e-5 as in CleanRL
    optimizer = Adam(model.parameters(), lr=config.lr, eps=1e-5, eps_hat=False)
    name = resolve_reducer(config.reducer, "cpu")  # "auto": shm when every replica is on this host
    reducer = create_reducer(name, timeout_s=config.timeout) if world_size > 1 else None
    allreduce_ = reducer.allreduce_ if reducer is not None else None
    # every replica keeps ceil(100 / R) episodes: the solved test averages 100 episodes of the whole job
    stats = EpisodeStats(solved_threshold(config.env), window=math.ceil(100 / world_size))
    values = {**flat_values(config), "algorithm": "sync-pg"}
    first_update, solved_at, wall_offset, checkpoint = 0, None, 0.0, None
    if config.resume is not None:
        saved, mine = load_rl_checkpoint(config.resume, values, rank=rank, world_size=world_size)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        minibatch_generator.set_state(saved["minibatch_generator"])
        first_update, wall_offset = saved["updates"], saved["wall_time"]
        solved_at = tuple(saved["solved_at"]) if saved.get("solved_at") else None
        restore_stats(stats, mine["stats"])
        for generator, state in zip(generators, mine["generators"], strict=True):
            generator.set_state(state)
        _reset_envs(envs, config, first_env, first_update)
        if rank == 0:
            cut_metrics(out, first_update)
    metrics = RLMetrics(
        out if rank == 0 else None,
        rank=rank,
        world_size=world_size,
        role="replica",
        algorithm=f"sync-pg/{config.algo}",
        env_id=config.env,
        quiet=config.quiet or rank != 0,
        tensorboard=config.tensorboard,
        append=config.resume is not None,
    )
    metrics.resumed(stats.env_steps, first_update, wall_offset)
    batch = config.num_envs * config.rollout_steps * world_size
    num_updates = max(1, config.total_steps // batch)
    start = last_log = time.perf_counter()
    updates = first_update
    verdict = torch.tensor([stats.mean_return or 0.0, 0.0, 0.0])
    try:
        for updates in range(first_update + 1, num_updates + 1):
            if config.anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * (1.0 - (updates - 1) / num_updates)
            rollout = collect_rollout(model, envs, config.rollout_steps, generators, stats)
            info = pg_update(
                model,
                optimizer,
                rollout,
                config,
                minibatch_generator,
                allreduce_=allreduce_,
                world_size=world_size,
            )
            metrics.add_loss(info["loss"])
            # one small collective per update: the job's mean return, whether all windows are full, and
            # rank 0's time-limit verdict, so every replica stops after the same update
            elapsed = time.perf_counter() - start
            full = len(stats.recent) == stats.recent.maxlen
            verdict = torch.tensor(
                [stats.mean_return or 0.0, float(full), float(elapsed > config.time_limit)]
            )
            if world_size > 1:
                dist.all_reduce(verdict)
                verdict[0] /= world_size
            job_solved = (
                stats.threshold is not None and verdict[1] == world_size and verdict[0] >= stats.threshold
            )
            if job_solved and solved_at is None:
                solved_at = (stats.env_steps * world_size, wall_offset + elapsed)
            now = time.perf_counter()
            if now - last_log >= config.log_every:
                last_log = now
                stats.solved_at = solved_at
                metrics.log(
                    updates,
                    stats,
                    lr=optimizer.param_groups[0]["lr"],
                    bytes_sent=reducer.bytes_sent if reducer else 0,
                    job_episode_return=float(verdict[0]),
                )
            if config.checkpoint_every and updates % config.checkpoint_every == 0:
                shared = {
                    "algorithm": "sync-pg",
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "minibatch_generator": minibatch_generator.get_state(),
                    "solved_at": list(solved_at) if solved_at else None,
                    "wall_time": wall_offset + time.perf_counter() - start,
                }
                mine = {"stats": stats_state(stats), "generators": [g.get_state() for g in generators]}
                path = save_rl_checkpoint(
                    out, updates, shared, mine, rank=rank, world_size=world_size, config_values=values
                )
                checkpoint = str(path) if path else checkpoint
                _reset_envs(envs, config, first_env, updates)
            if (job_solved and config.stop_when_solved) or verdict[2] > 0:
                break
        stats.solved_at = solved_at
        summary_record = metrics.log(updates, stats, kind="summary", job_episode_return=float(verdict[0]))
        if rank == 0:
            save_policy(out / "policy.pt", model, config.env, algorithm="sync-pg", updates=updates)
    finally:
        metrics.close()
        envs.close()
        if reducer is not None:
            reducer.close()
    return {
        "algorithm": f"sync-pg/{config.algo}",
        "workers": world_size,
        "rank": rank,
        "env_steps": stats.env_steps * world_size,
        "updates": updates,
        "seconds": time.perf_counter() - start,
        "solved_env_steps": solved_at[0] if solved_at else None,
        "solved_seconds": solved_at[1] if solved_at else None,
        "final_return": float(verdict[0]),
        "env_steps_per_s": summary_record.samples_per_s * world_size,
        "resumed_from_update": first_update if config.resume is not None else None,
        "checkpoint": checkpoint,
    }


def _reset_envs(envs: EnvPool, config: RLConfig, first_env: int, updates: int) -> None:
    """The checkpoint boundary: every environment reset with a seed of its index and the update."""
    envs.reset_all([boundary_seed(config.seed, first_env + i, updates) for i in range(envs.num_envs)])
