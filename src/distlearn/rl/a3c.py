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

Every process ends by itself: workers stop on the shared stop flag, at the step budget, or when the parent
disappears; the parent joins them with a deadline, then terminates and kills stragglers. A worker that
dies is reported and the others carry on.
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
import torch.multiprocessing as mp

from distlearn.errors import CommError
from distlearn.optim import RMSProp
from distlearn.rl.common import (
    ActorCritic,
    EnvPool,
    EpisodeStats,
    RLMetrics,
    collect_rollout,
    env_generators,
    n_step_returns,
    policy_gradient_loss,
    save_policy,
    solved_threshold,
)
from distlearn.rl.config import RLConfig, resolve

__all__ = ["run_a3c", "shared_rmsprop"]

RMSPROP_DECAY = 0.99  # the paper's alpha
RMSPROP_EPS = 1e-5


def shared_rmsprop(model: torch.nn.Module, lr: float, state: list[torch.Tensor] | None = None) -> RMSProp:
    """distlearn's RMSProp on ``model`` with its statistics (``s + eps``) in shared memory.

    Pass the ``state`` tensors of another process's optimizer to share them (the A3C workers do).
    """
    optimizer = RMSProp(model.parameters(), lr=lr, decay=RMSPROP_DECAY, eps=RMSPROP_EPS)
    params = list(model.parameters())
    state = state or [torch.full_like(p, RMSPROP_EPS).share_memory_() for p in params]
    for param, square_avg_eps in zip(params, state, strict=True):
        optimizer.state[param] = {"step": 0, "square_avg_eps": square_avg_eps}
    return optimizer


def run_a3c(config: RLConfig, *, fail_worker: int | None = None) -> dict[str, Any]:
    """Train with A3C: ``config.workers`` actor-learner processes; returns the run's summary.

    ``fail_worker`` (for tests) makes that worker exit with code 3 after its first update.
    """
    config = resolve(config, "a3c")
    torch.set_num_threads(1)
    out = Path(config.out or "runs/rl-a3c")
    probe = EnvPool(config.env, 1, config.seed)
    obs_dim, num_actions = probe.obs_dim, probe.num_actions
    probe.close()
    torch.manual_seed(config.seed)
    model = ActorCritic(obs_dim, num_actions, image_shape=probe.image_shape)
    model.share_memory()
    square_avgs = [s["square_avg_eps"] for s in shared_rmsprop(model, config.lr).state.values()]
    context = mp.get_context("spawn")
    counters = context.Array("q", 2)  # [updates applied to theta (its version), env steps of all workers]
    stop = context.Event()
    results: Any = context.Queue()
    workers = [
        context.Process(
            target=_actor_learner,
            args=(k, config, model, square_avgs, counters, stop, results, os.getpid(), k == fail_worker),
            name=f"a3c-worker-{k}",
            daemon=True,
        )
        for k in range(config.workers)
    ]
    for worker in workers:
        worker.start()
    stats = EpisodeStats(solved_threshold(config.env))
    metrics = RLMetrics(
        out,
        role="a3c-parent",
        world_size=config.workers,
        algorithm="a3c",
        env_id=config.env,
        quiet=config.quiet,
    )
    start = last_log = time.perf_counter()
    dead: set[int] = set()

    def record(result: tuple[list[float], int, int]) -> None:
        returns, steps, staleness = result
        stats.add(returns, steps)
        metrics.add_staleness(staleness)

    try:
        while True:
            with contextlib.suppress(queue.Empty):
                record(results.get(timeout=0.2))
            for k, worker in enumerate(workers):
                if k not in dead and worker.exitcode not in (None, 0):
                    dead.add(k)
                    print(
                        f"[a3c] worker {k} died (exit code {worker.exitcode}); the others carry on",
                        flush=True,
                    )
            now = time.perf_counter()
            if now - last_log >= config.log_every:
                last_log = now
                metrics.log(counters[0], stats)
            if (stats.solved and config.stop_when_solved) or now - start > config.time_limit:
                break
            if all(not worker.is_alive() for worker in workers):
                break  # every worker reached the step budget (or died)
    finally:
        stop.set()
        _join_all(workers, results, record, deadline_s=config.timeout)
        summary_record = metrics.log(counters[0], stats, kind="summary", dead_workers=sorted(dead))
        metrics.close()
    save_policy(out / "policy.pt", model, config.env, algorithm="a3c", updates=int(counters[0]))
    if len(dead) == len(workers):
        raise CommError(
            f"every A3C worker died (exit codes {[w.exitcode for w in workers]}); see their errors above"
        )
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
        "dead_workers": sorted(dead),
    }


def _join_all(workers: list[Any], results: Any, record: Any, deadline_s: float) -> None:
    """Join every worker within ``deadline_s`` (recording what is still in the queue, so none blocks on a
    full pipe), then terminate, then kill what is left."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            record(results.get(timeout=0.05))
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                break
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
            worker.join()
    results.close()
    results.join_thread()


def _actor_learner(
    k: int,
    config: RLConfig,
    shared_model: ActorCritic,
    square_avgs: list[torch.Tensor],
    counters: Any,
    stop: multiprocessing.synchronize.Event,
    results: Any,
    parent: int,
    fail: bool,
) -> None:
    """Worker ``k``: copy theta, roll out t_max steps, push its gradient into the shared weights, repeat."""
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
        if steps_done >= config.total_steps:
            break
        if config.anneal_lr:  # the paper anneals eta linearly to 0 over the run
            optimizer.param_groups[0]["lr"] = config.lr * max(0.0, 1.0 - steps_done / config.total_steps)
        local.load_state_dict(shared_model.state_dict())  # theta' <- theta
        version = counters[0]
        before = stats.env_steps
        rollout = collect_rollout(local, envs, config.rollout_steps, generators, stats)
        with torch.no_grad():
            _, bootstrap = local(rollout.next_obs)
        returns = n_step_returns(rollout.rewards, rollout.dones, bootstrap, config.gamma)
        loss, _ = policy_gradient_loss(
            local,
            rollout.obs.reshape(-1, envs.obs_dim),
            rollout.actions.reshape(-1),
            (returns - rollout.values).reshape(-1),
            returns.reshape(-1),
            value_coef=config.value_coef,
            entropy_coef=config.entropy_coef,
        )
        local.zero_grad()
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(local.parameters(), config.max_grad_norm)
        for shared, own in zip(shared_params, local.parameters(), strict=True):
            shared.grad = own.grad
        optimizer.step()  # Hogwild!: no lock around the shared weights and statistics
        with counters.get_lock():
            staleness = counters[0] - version  # updates by others since theta' was read
            counters[0] += 1
            counters[1] += stats.env_steps - before
        results.put((list(stats.recent), stats.env_steps - before, staleness))  # episodes ended this rollout
        stats.recent.clear()
        if fail:  # flush the queue's feeder thread first, so only the process is lost, not its report
            results.close()
            results.join_thread()
            os._exit(3)
    envs.close()
