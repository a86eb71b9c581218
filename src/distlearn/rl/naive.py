"""Naive parallel RL: R rollout workers with copies of the policy, one learner; synchronous, the baseline.

The overview's first way to use many machines for RL: the expensive part, acting in the environment, runs
on R workers, each with a copy of the policy ``pi(.|s; theta)``; they send their trajectories to one learner,
which updates ``theta`` and broadcasts it back before the next rollout. One torchrun job of R + 1 ranks:
rank 0 is the learner, ranks 1..R the workers. Each iteration::

    workers:  roll out T steps in N environments with theta  ->  gather (T x N trajectories) to rank 0
    learner:  theta <- PPO/A2C update on the R N environments' T steps  ->  broadcast theta to every worker

Because everything is synchronous the trajectories are always on-policy (staleness 0) and the result is
that of one process with R N environments (the same per-environment seeds); the cost is that the learner
waits for the slowest worker, and the workers wait while the learner trains. Compare sync-pg, where every
worker also learns and only gradients travel.

Communication: c10d collectives of the default group (``gather`` of one flat float32 tensor per worker:
observations, actions, log-probabilities, values, rewards, dones, the next observations and the returns of
the episodes that ended; ``broadcast`` of the flat weights), each bounded by ``--timeout`` (the group's
timeout), so a dead worker makes every other rank fail within it. Where we differ: the learner rank does not
act. Tuning: as sync-pg (``--lr``, ``--num-envs``, ``--rollout-steps``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distlearn.errors import CommError, ConfigError
from distlearn.launch import in_torchrun, init_distributed, shutdown
from distlearn.optim import Adam
from distlearn.rl.checkpointing import boundary_seed, cut_metrics, load_rl_checkpoint, save_rl_checkpoint
from distlearn.rl.common import (
    ActorCritic,
    EnvPool,
    EpisodeStats,
    RLMetrics,
    Rollout,
    collect_rollout,
    env_generators,
    flat_parameters,
    load_flat_parameters,
    pg_update,
    restore_stats,
    save_policy,
    solved_threshold,
    stats_state,
)
from distlearn.rl.config import RLConfig, flat_values, resolve

__all__ = ["run_naive"]


def run_naive(config: RLConfig) -> dict[str, Any]:
    """Run this rank's role: rank 0 learns, the others roll out. Returns a summary."""
    config = resolve(config, "naive")
    if not in_torchrun():
        raise ConfigError("naive runs as a torchrun job of R + 1 ranks: use `distlearn rl naive --workers R`")
    context = init_distributed(timeout_s=config.timeout)
    if context.world_size < 2:
        raise ConfigError("naive needs a learner and at least one worker: run with 2 or more ranks")
    torch.set_num_threads(1)
    try:
        return _run(config, context.rank, context.world_size, Path(config.out or "runs/rl-naive"))
    except RuntimeError as error:  # gloo reports timeouts and closed peers as RuntimeError
        raise CommError(
            f"naive: rank {context.rank}: {str(error).splitlines()[0]}; a peer may have died"
        ) from error
    finally:
        shutdown()


def _run(config: RLConfig, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    workers = world_size - 1
    n, steps = config.num_envs, config.rollout_steps
    torch.manual_seed(config.seed)
    envs = EnvPool(config.env, n, config.seed, first_index=(rank - 1) * n) if rank else None
    probe = envs or EnvPool(config.env, 1, config.seed)
    obs_dim, num_actions = probe.obs_dim, probe.num_actions
    if envs is None:
        probe.close()
    model = ActorCritic(obs_dim, num_actions, image_shape=probe.image_shape)
    generators = env_generators(config.seed, (rank - 1) * n, n) if rank else []
    slots = steps * n + 1  # at most T N episodes end in a rollout; slot 0 counts them
    length = Rollout.empty(steps, n, obs_dim).flat().numel() + slots
    stats = EpisodeStats(solved_threshold(config.env))
    metrics = RLMetrics(
        out if rank == 0 else None,
        rank=rank,
        world_size=world_size,
        role="learner" if rank == 0 else "worker",
        algorithm=f"naive/{config.algo}",
        env_id=config.env,
        quiet=config.quiet or rank != 0,
        tensorboard=config.tensorboard,
        append=config.resume is not None,
    )
    optimizer = Adam(model.parameters(), lr=config.lr, eps=1e-5, eps_hat=False) if rank == 0 else None
    minibatch_generator = torch.Generator().manual_seed(config.seed)
    values = {**flat_values(config), "algorithm": "naive"}
    first_update, wall_offset, bytes_sent, checkpoint = 0, 0.0, 0, None
    if config.resume is not None:
        saved, mine = load_rl_checkpoint(config.resume, values, rank=rank, world_size=world_size)
        model.load_state_dict(saved["model"])
        minibatch_generator.set_state(saved["minibatch_generator"])
        first_update, wall_offset = saved["updates"], saved["wall_time"]
        if rank == 0:
            optimizer.load_state_dict(saved["optimizer"])
            restore_stats(stats, mine["stats"])
            cut_metrics(out, first_update)
        else:
            for generator, state in zip(generators, mine["generators"], strict=True):
                generator.set_state(state)
            _reset_envs(envs, config, rank, first_update)
    metrics.resumed(stats.env_steps, first_update, wall_offset)
    num_updates = max(1, config.total_steps // (workers * n * steps))
    start = last_log = time.perf_counter()
    updates, control = first_update, torch.zeros(1)
    for updates in range(first_update + 1, num_updates + 1):
        if rank:  # worker: roll out with this copy of theta, send the trajectories
            local = EpisodeStats()
            rollout = collect_rollout(model, envs, steps, generators, local)
            finished = torch.zeros(slots)
            finished[0] = len(local.recent)
            finished[1 : 1 + len(local.recent)] = torch.tensor(list(local.recent))
            message = torch.cat([rollout.flat(), finished])
            dist.gather(message, dst=0)
            bytes_sent += message.numel() * 4
        else:  # learner: gather, update theta
            received = [torch.zeros(length) for _ in range(world_size)]
            dist.gather(torch.zeros(length), received, dst=0)
            parts = []
            for message in received[1:]:
                parts.append(Rollout.unflat(message[: length - slots], steps, n, obs_dim))
                finished = message[length - slots :]
                stats.add(finished[1 : 1 + int(finished[0])].tolist(), steps * n)
            if config.anneal_lr:
                optimizer.param_groups[0]["lr"] = config.lr * (1.0 - (updates - 1) / num_updates)
            info = pg_update(model, optimizer, Rollout.concat(parts), config, minibatch_generator)
            metrics.add_loss(info["loss"])
            elapsed = time.perf_counter() - start
            done = (stats.solved and config.stop_when_solved) or elapsed > config.time_limit
            control[0] = float(done)
            if time.perf_counter() - last_log >= config.log_every:
                last_log = time.perf_counter()
                metrics.log(updates, stats, lr=optimizer.param_groups[0]["lr"], bytes_sent=bytes_sent)
        # theta and the learner's verdict to every worker (one broadcast)
        weights = torch.cat([flat_parameters(model), control])
        dist.broadcast(weights, src=0)
        if rank == 0:
            bytes_sent += weights.numel() * 4 * workers
        load_flat_parameters(model, weights[:-1])
        if config.checkpoint_every and updates % config.checkpoint_every == 0:
            shared = {
                "algorithm": "naive",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "minibatch_generator": minibatch_generator.get_state(),
                "wall_time": wall_offset + time.perf_counter() - start,
            }
            mine = {"stats": stats_state(stats), "generators": [g.get_state() for g in generators]}
            path = save_rl_checkpoint(
                out, updates, shared, mine, rank=rank, world_size=world_size, config_values=values
            )
            checkpoint = str(path) if path else checkpoint
            if rank:
                _reset_envs(envs, config, rank, updates)
        if weights[-1] > 0:
            break
    summary = metrics.log(updates, stats, kind="summary", bytes_sent=bytes_sent)
    metrics.close()
    if envs is not None:
        envs.close()
    if rank == 0:
        save_policy(out / "policy.pt", model, config.env, algorithm="naive", updates=updates)
    return {
        "algorithm": f"naive/{config.algo}",
        "workers": workers,
        "rank": rank,
        "env_steps": stats.env_steps,
        "updates": updates,
        "seconds": time.perf_counter() - start,
        "solved_env_steps": stats.solved_at[0] if stats.solved_at else None,
        "solved_seconds": stats.solved_at[1] if stats.solved_at else None,
        "final_return": stats.mean_return,
        "env_steps_per_s": summary.samples_per_s,
        "resumed_from_update": first_update if config.resume is not None else None,
        "checkpoint": checkpoint,
    }


def _reset_envs(envs: EnvPool, config: RLConfig, rank: int, updates: int) -> None:
    """The checkpoint boundary: worker ``rank``'s environments reset with seeds of their index and update."""
    first = (rank - 1) * config.num_envs
    envs.reset_all([boundary_seed(config.seed, first + i, updates) for i in range(envs.num_envs)])
