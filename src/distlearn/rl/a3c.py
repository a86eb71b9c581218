"""A3C: asynchronous advantage actor-critic (Mnih et al., "Asynchronous Methods for Deep RL", ICML 2016).

R actor-learner processes (``torch.multiprocessing``, spawn) share one set of weights ``theta`` and the
RMSProp statistics ``g`` in shared memory. Each one, without locks (Hogwild!, Recht et al. 2011), repeats
(the paper's Algorithm S3)::

    theta' <- theta                                   # copy the shared weights
    run pi(.|s; theta') for t_max steps (or to the end of the episode)
    R = V(s_t; theta')  (0 if terminal);  for i = t-1 ... t_start:  R <- r_i + gamma R
    d theta = sum_i grad log pi(a_i|s_i; theta') (R_i - V(s_i)) + beta grad H(pi(s_i))
              - c_v grad (R_i - V(s_i))^2 / 2
    g <- alpha g + (1 - alpha) d theta^2 ;  theta <- theta - eta d theta / sqrt(g + eps)   # shared RMSProp

Staleness: between the copy ``theta' <- theta`` and its own update, a worker's gradient was computed on
weights that other workers have since changed; we log how many updates came in between (mean per record).

Where we differ: the RMSProp is distlearn's (:class:`distlearn.optim.RMSProp`, ``sqrt(g + eps) + eps``),
its state tensors created up front and moved to shared memory so every worker updates the same statistics
(the paper's "shared RMSProp"); the gradient is clipped (norm ``--max-grad-norm``); a worker runs several
environments (``--num-envs``, default 4; the paper: 1), which made CartPole-v1 solve reliably; the episode
returns go to the parent process through a queue, and the parent decides when the job is solved. The
learning rate decays linearly to 0 over ``--total-steps`` as in the paper. Tuning: ``--lr`` (2e-3 for
CartPole), ``--rollout-steps`` (t_max, 5-20; 10 here), ``--entropy-coef`` 0.01.

**Across machines** (``--servers S``, the issue's "the shared model lives on a parameter-server rank"):
the job is ``S + R`` torchrun ranks; ranks ``0 .. S-1`` are distlearn's parameter servers
(:class:`distlearn.parallel.ps.ParameterServer`, the same transport as ``--strategy ps``) holding ``theta``
and the RMSProp statistics ``g`` (the server's optimizer *is* the shared RMSProp), and each of the ``R``
actor-learner ranks loops: roll out ``t_max`` steps with the weights it last pulled, compute ``d theta``,
push it and pull the new ``theta`` -- Algorithm S3 with the copy ``theta' <- theta`` done by the pull. The
servers record each update's staleness (``ps-server<rank>.json``). Episode returns and the global step
count go through the job's c10d store (an atomic counter and an append-only list), so the first
actor-learner rank can decide "solved" over every worker's episodes and tell the others to stop. With one
worker the run equals the shared-memory one with one worker (test), and on one machine the pair moves its
payloads through shared memory anyway.

Every process ends by itself: workers stop on the shared stop flag, at the step budget, or when the parent
disappears; they are a :class:`distlearn.pool.ProcessPool`, which the parent waits for with a deadline
(``--timeout``) before it stops stragglers (SIGTERM, then SIGKILL), and which stops them all on SIGTERM or
Ctrl-C. A worker that dies is reported (its exit code, or its exception and traceback) and the others
carry on.
"""

from __future__ import annotations

import contextlib
import multiprocessing.synchronize
import os
import queue
import time
from pathlib import Path
from typing import Any

import torch

from distlearn.errors import CommError, ConfigError
from distlearn.optim import RMSProp
from distlearn.pool import PoolTimeout, ProcessPool, WorkerFailure, spawn_context
from distlearn.rl.checkpointing import cut_metrics, load_rl_checkpoint, save_rl_checkpoint
from distlearn.rl.common import (
    ActorCritic,
    EnvPool,
    EpisodeStats,
    RLMetrics,
    collect_rollout,
    env_generators,
    n_step_returns,
    policy_gradient_loss,
    restore_stats,
    save_policy,
    solved_threshold,
    stats_state,
)
from distlearn.rl.config import RLConfig, flat_values, resolve

__all__ = ["run_a3c", "shared_rmsprop"]

RMSPROP_DECAY = 0.99  # the paper's alpha
RMSPROP_EPS = 1e-5


def shared_rmsprop(
    model: torch.nn.Module | list[torch.Tensor],
    lr: float,
    state: list[torch.Tensor] | None = None,
    *,
    share: bool = True,
) -> RMSProp:
    """distlearn's RMSProp on ``model`` (or a list of tensors) with its statistics (``s + eps``) in shared
    memory (``share=False``: in the process's own memory, as on a parameter server).

    Pass the ``state`` tensors of another process's optimizer to share them (the A3C workers do).
    """
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else list(model)
    optimizer = RMSProp(params, lr=lr, decay=RMSPROP_DECAY, eps=RMSPROP_EPS)
    state = state or [
        torch.full_like(p, RMSPROP_EPS).share_memory_() if share else torch.full_like(p, RMSPROP_EPS)
        for p in params
    ]
    for param, square_avg_eps in zip(params, state, strict=True):
        optimizer.state[param] = {"step": 0, "square_avg_eps": square_avg_eps}
    return optimizer


def run_a3c(config: RLConfig, *, fail_worker: int | None = None) -> dict[str, Any]:
    """Train with A3C: ``config.workers`` actor-learner processes; returns the run's summary.

    ``fail_worker`` (for tests) makes that worker exit with code 3 after its first update, which it makes
    even when the others have already spent the step budget (so a slow start cannot hide the failure).
    """
    config = resolve(config, "a3c")
    torch.set_num_threads(1)
    out = Path(config.out or "runs/rl-a3c")
    if config.servers:
        return _run_on_servers(config, out, fail=fail_worker)
    probe = EnvPool(config.env, 1, config.seed)
    obs_dim, num_actions = probe.obs_dim, probe.num_actions
    probe.close()
    torch.manual_seed(config.seed)
    model = ActorCritic(obs_dim, num_actions, image_shape=probe.image_shape)
    model.share_memory()
    square_avgs = [s["square_avg_eps"] for s in shared_rmsprop(model, config.lr).state.values()]
    context = spawn_context()
    counters = context.Array("q", 2)  # [updates applied to theta (its version), env steps of all workers]
    values = {**flat_values(config), "algorithm": "a3c"}
    saved = None
    if config.resume is not None:  # theta, the RMSProp statistics and the counters; not bitwise (async)
        saved, _ = load_rl_checkpoint(config.resume, values, rank=0, world_size=1)
        with torch.no_grad():
            model.load_state_dict(saved["model"])
            for mine, theirs in zip(square_avgs, saved["square_avgs"], strict=True):
                mine.copy_(theirs)
        counters[0], counters[1] = saved["updates"], saved["env_steps"]
    stop = context.Event()
    results: Any = context.Queue()
    pool = ProcessPool(
        _actor_learner,
        config.workers,
        (config, model, square_avgs, counters, stop, results, os.getpid(), fail_worker),
        name="a3c",
        stop_on_failure=False,  # a worker that dies is reported; the others carry on
    )
    with pool:
        stats = EpisodeStats(solved_threshold(config.env))
        metrics = RLMetrics(
            out,
            role="a3c-parent",
            world_size=config.workers,
            algorithm="a3c",
            env_id=config.env,
            quiet=config.quiet,
            tensorboard=config.tensorboard,
            append=saved is not None,
        )
        first_update, wall_offset, checkpoint = 0, 0.0, None
        if saved is not None:
            restore_stats(stats, saved["ranks"][0]["stats"])
            first_update, wall_offset = saved["updates"], saved["wall_time"]
            cut_metrics(out, first_update)
        metrics.resumed(stats.env_steps, first_update, wall_offset)
        start = last_log = time.perf_counter()
        dead: list[WorkerFailure] = []
        every = config.checkpoint_every
        next_checkpoint = (first_update // every + 1) * every if every else None

        def save() -> tuple[int, str]:  # read while the workers write: Hogwild!'s snapshot, not bitwise
            with counters.get_lock():
                updates, env_steps = int(counters[0]), int(counters[1])
            shared = {
                "algorithm": "a3c",
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "square_avgs": [s.clone() for s in square_avgs],
                "env_steps": env_steps,
                "wall_time": wall_offset + time.perf_counter() - start,
            }
            mine = {"stats": stats_state(stats)}
            path = save_rl_checkpoint(out, updates, shared, mine, rank=0, world_size=1, config_values=values)
            return updates, str(path)

        def record(result: tuple[list[float], int, int, float]) -> None:
            returns, steps, staleness, loss = result
            stats.add(returns, steps)
            metrics.add_staleness(staleness)
            metrics.add_loss(loss)

        def record_waiting() -> None:  # so that no worker blocks at exit on a full queue
            with contextlib.suppress(queue.Empty):
                while True:
                    record(results.get_nowait())

        def report_dead() -> None:
            for failure in pool.poll():
                dead.append(failure)
                message = f"[a3c] worker {failure.rank} died ({failure.summary}); the others carry on"
                print(message + (f"\n{failure.traceback.rstrip()}" if failure.traceback else ""), flush=True)

        try:
            while True:
                with contextlib.suppress(queue.Empty):
                    record(results.get(timeout=0.2))
                report_dead()
                if next_checkpoint is not None and counters[0] >= next_checkpoint:
                    done, checkpoint = save()
                    next_checkpoint = (done // every + 1) * every
                now = time.perf_counter()
                if now - last_log >= config.log_every:
                    last_log = now
                    metrics.log(counters[0], stats)
                if (stats.solved and config.stop_when_solved) or now - start > config.time_limit:
                    break
                if not pool.running:
                    break  # every worker reached the step budget (or died)
        finally:
            stop.set()
            try:
                pool.wait(config.timeout, every=record_waiting)
            except PoolTimeout as late:
                print(f"[a3c] {late}", flush=True)
            record_waiting()
            results.close()
            results.join_thread()
            dead.extend(f for rank, f in sorted(pool.failures.items()) if rank not in {d.rank for d in dead})
            dead_workers = sorted(failure.rank for failure in dead)  # also those found while waiting
            summary_record = metrics.log(counters[0], stats, kind="summary", dead_workers=dead_workers)
            metrics.close()
    save_policy(out / "policy.pt", model, config.env, algorithm="a3c", updates=int(counters[0]))
    if len(dead) == config.workers:
        how = "; ".join(f"worker {failure.rank}: {failure.summary}" for failure in dead)
        raise CommError(f"every A3C worker died ({how}); see their errors above")
    return {
        "algorithm": "a3c",
        "workers": config.workers,
        "rank": 0,
        "env_steps": stats.env_steps,
        "updates": int(counters[0]),
        "seconds": time.perf_counter() - start,
        "solved_env_steps": stats.solved_at[0] if stats.solved_at else None,
        "solved_seconds": stats.solved_at[1] if stats.solved_at else None,
        "final_return": stats.mean_return,
        "env_steps_per_s": summary_record.samples_per_s,
        "dead_workers": dead_workers,
        "resumed_from_update": first_update if saved is not None else None,
        "checkpoint": checkpoint,
    }


def _rollout_gradient(
    model: ActorCritic, envs: EnvPool, generators: Any, stats: EpisodeStats, config: RLConfig
) -> float:
    """Run ``t_max`` steps with ``model``, leave A3C's clipped gradient ``d theta`` in its ``.grad``; returns
    the loss."""
    rollout = collect_rollout(model, envs, config.rollout_steps, generators, stats)
    with torch.no_grad():
        _, bootstrap = model(rollout.next_obs)
    returns = n_step_returns(rollout.rewards, rollout.dones, bootstrap, config.gamma)
    loss, _ = policy_gradient_loss(
        model,
        rollout.obs.reshape(-1, envs.obs_dim),
        rollout.actions.reshape(-1),
        (returns - rollout.values).reshape(-1),
        returns.reshape(-1),
        value_coef=config.value_coef,
        entropy_coef=config.entropy_coef,
    )
    model.zero_grad()
    loss.backward()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    return float(loss)


def _actor_learner(
    k: int,
    config: RLConfig,
    shared_model: ActorCritic,
    square_avgs: list[torch.Tensor],
    counters: Any,
    stop: multiprocessing.synchronize.Event,
    results: Any,
    parent: int,
    fail_worker: int | None,
) -> None:
    """Worker ``k``: copy theta, roll out t_max steps, push its gradient into the shared weights, repeat."""
    fail = k == fail_worker
    torch.set_num_threads(1)
    first_env = k * config.num_envs
    envs = EnvPool(config.env, config.num_envs, config.seed, first_index=first_env)
    generators = env_generators(config.seed, first_env, config.num_envs)
    local = ActorCritic(envs.obs_dim, envs.num_actions, image_shape=envs.image_shape)
    optimizer = shared_rmsprop(shared_model, config.lr, square_avgs)
    shared_params = list(shared_model.parameters())
    stats = EpisodeStats()
    while not stop.is_set() and os.getppid() == parent:
        steps_done = counters[1]
        if steps_done >= config.total_steps and not fail:  # the failing worker always makes its one update
            break
        if config.anneal_lr:  # the paper anneals eta linearly to 0 over the run
            optimizer.param_groups[0]["lr"] = config.lr * max(0.0, 1.0 - steps_done / config.total_steps)
        local.load_state_dict(shared_model.state_dict())  # theta' <- theta
        version = counters[0]
        before = stats.env_steps
        loss = _rollout_gradient(local, envs, generators, stats, config)  # d theta in local's .grad
        for shared, own in zip(shared_params, local.parameters(), strict=True):
            shared.grad = own.grad
        optimizer.step()  # Hogwild!: no lock around the shared weights and statistics
        with counters.get_lock():
            staleness = counters[0] - version  # updates by others since theta' was read
            counters[0] += 1
            counters[1] += stats.env_steps - before
        # the returns of the episodes that ended this rollout, its steps, staleness and loss
        results.put((list(stats.recent), stats.env_steps - before, staleness, loss))
        stats.recent.clear()
        if fail:  # flush the queue's feeder thread first, so only the process is lost, not its report
            results.close()
            results.join_thread()
            os._exit(3)
    envs.close()


# -- across machines: the shared model on parameter-server ranks ------------------------------------------

_STEPS, _RETURNS, _STOP = "distlearn/a3c/env_steps", "distlearn/a3c/returns", "distlearn/a3c/stop"
_CHECK_EVERY_S = 0.25  # how often the first worker reads every worker's returns for the solved test


def _run_on_servers(config: RLConfig, out: Path, *, fail: int | None = None) -> dict[str, Any]:
    """This rank's part of an A3C job whose shared weights and RMSProp live on ``config.servers`` ranks."""
    import torch.distributed as dist

    from distlearn.launch import in_torchrun
    from distlearn.parallel.ps import ParameterServer

    if not in_torchrun() and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"a3c --servers {config.servers} runs as a torchrun job of servers + workers ranks: use "
            f"`distlearn rl a3c --servers {config.servers} --workers R`"
        )
    strategy = ParameterServer(
        servers=config.servers,
        optimizer=lambda tensors: shared_rmsprop(tensors, config.lr, share=False),
        lr=config.lr,
        timeout_s=config.timeout,
        worker_timeout_s=config.timeout,
        out=out,
    )
    strategy.setup(config.seed)
    try:
        if not strategy.trains:
            strategy.serve()
            return {"algorithm": "a3c", "rank": strategy.rank, "role": "server", "main": False}
        return _remote_actor_learner(config, strategy, out, fail=fail == strategy.replica_index)
    finally:
        strategy.close()


def _remote_actor_learner(config: RLConfig, strategy: Any, out: Path, *, fail: bool) -> dict[str, Any]:
    """Worker ``k`` of ``--servers S``: roll out with the pulled theta, push d theta, pull; the first worker
    also gathers everyone's returns from the store, logs, decides "solved" and saves the policy."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()  # the job's c10d store (torchrun's rendezvous)
    k, main = strategy.replica_index, strategy.is_main
    first_env = k * config.num_envs
    envs = EnvPool(config.env, config.num_envs, config.seed, first_index=first_env)
    generators = env_generators(config.seed, first_env, config.num_envs)
    torch.manual_seed(config.seed)  # every rank builds the same initial theta (the first INIT sets it)
    model = ActorCritic(envs.obs_dim, envs.num_actions, image_shape=envs.image_shape)
    lr_carrier = torch.optim.SGD(model.parameters(), lr=config.lr)  # its lr travels with each push
    strategy.prepare(model, lr_carrier)  # the first pull: theta' <- theta
    own = EpisodeStats()
    everyone = EpisodeStats(solved_threshold(config.env))
    metrics = (
        RLMetrics(
            out,
            role="a3c-worker",
            world_size=strategy.workers,
            algorithm="a3c",
            env_id=config.env,
            quiet=config.quiet,
            tensorboard=config.tensorboard,
        )  # fmt: skip
        if main
        else None
    )
    start = last_log = last_check = time.perf_counter()
    read, updates = 0, 0
    while True:
        steps_done = store.add(_STEPS, 0)
        out_of_budget = steps_done >= config.total_steps or time.perf_counter() - start > config.time_limit
        if out_of_budget and not fail:  # the failing worker always makes its one push
            break
        if store.check([_STOP]):
            break
        if config.anneal_lr:  # the paper anneals eta linearly to 0 over the run; the server uses this lr
            lr_carrier.param_groups[0]["lr"] = config.lr * max(0.0, 1.0 - steps_done / config.total_steps)
        before = own.env_steps
        loss = _rollout_gradient(model, envs, generators, own, config)  # d theta in model's .grad
        strategy.before_step(model, lr_carrier, updates)  # push d theta; pull theta (the servers' RMSProp)
        updates += 1
        store.add(_STEPS, own.env_steps - before)
        if own.recent:
            store.append(_RETURNS, "".join(f"{value!r}," for value in own.recent))
            own.recent.clear()
        if fail:
            os._exit(3)
        if metrics is None:
            continue
        metrics.add_staleness(max(strategy.staleness_seen[-1]))
        metrics.add_loss(loss)  # the first worker's own losses (the others' stay on their ranks)
        now = time.perf_counter()
        if now - last_check >= _CHECK_EVERY_S:
            last_check = now
            read = _gather(store, everyone, read)
            if everyone.solved and config.stop_when_solved:
                store.set(_STOP, "solved")
                break
        if now - last_log >= config.log_every:
            last_log = now
            metrics.log(strategy._versions[0], everyone)
    envs.close()
    if metrics is None:
        return {"algorithm": "a3c", "rank": strategy.rank, "role": "worker", "main": False, "pushes": updates}
    store.set(_STOP, "done")  # the budget or the time limit: the other workers stop too
    _gather(store, everyone, read)
    summary = metrics.log(strategy._versions[0], everyone, kind="summary")
    metrics.close()
    save_policy(out / "policy.pt", model, config.env, algorithm="a3c", updates=strategy._versions[0])
    return {
        "algorithm": "a3c",
        "workers": strategy.workers,
        "servers": config.servers,
        "rank": strategy.rank,
        "main": True,
        "env_steps": everyone.env_steps,
        "updates": strategy._versions[0],
        "seconds": time.perf_counter() - start,
        "solved_env_steps": everyone.solved_at[0] if everyone.solved_at else None,
        "solved_seconds": everyone.solved_at[1] if everyone.solved_at else None,
        "final_return": everyone.mean_return,
        "env_steps_per_s": summary.samples_per_s,
    }


def _gather(store: Any, stats: EpisodeStats, read: int) -> int:
    """Add the returns appended to the store since byte ``read`` (and the steps since) to ``stats``."""
    text = store.get(_RETURNS).decode() if store.check([_RETURNS]) else ""
    new = [float(v) for v in text[read:].split(",") if v]
    stats.add(new, int(store.add(_STEPS, 0)) - stats.env_steps)
    return len(text)
