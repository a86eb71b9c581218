"""Gorila: distributed DQN (Nair et al., "Massively Parallel Methods for Deep RL", ICML workshop 2015).

Roles are ranks of one torchrun job talking over c10d point-to-point (the parameter-server core
:mod:`distlearn.comm.paramserver`: its fixed header, serving loop and staleness book, every wait with a
deadline): rank 0 is the **parameter server**, ranks 1..R are **bundles** -- the paper's bundled mode
(its section 4: "each learner samples from the local replay memory of its bundled actor"), so the replay
memory is sharded, one shard per actor, and transitions never cross the network. Each bundle:

* **actor**: acts epsilon-greedily with ``Q(s, a; theta)`` (the latest weights from the server) and stores
  ``(s, a, r, s', done)`` in its :class:`ReplayShard`;
* **learner**: every ``--train-every`` actor steps samples a minibatch uniformly from its shard and computes
  the DQN gradient ``grad_theta sum_j huber(y_j - Q(s_j, a_j; theta))`` with the target
  ``y_j = r_j + gamma (1 - term_j) Q(s'_j, argmax_a' Q(s'_j, a'; theta); theta^-)`` (double DQN, van Hasselt
  et al. 2016; ``--no-double-q``: ``max_a' Q(s'_j, a'; theta^-)``) from its **target network** ``theta^-``;
  sends it with the version of ``theta`` it used; the server's reply (newest ``theta``) travels while the
  actor takes its next ``--train-every`` steps and is read just before the next gradient is computed, so
  acting overlaps the round trip and every gradient is computed on the newest ``theta`` the bundle has
  (staleness 0 with R = 1; at R = 2 about 1, the other bundle's update landing in between);
* refreshes ``theta^- <- theta`` whenever the server's version crosses a multiple of ``--target-every``
  (the paper's "every N updates the target network is updated from the parameter server").

Only a terminal state ends a target's bootstrap: at CartPole's 500-step time limit the target bootstraps from
the state reached, as CleanRL's ``dqn.py`` does (treating the time limit as terminal gives the same state two
different values).

The **server** applies gradients as they arrive, in any order (asynchronous SGD; Adam here, AdaGrad in the
paper), and records staleness = its version now minus the version the gradient was computed on. It also
gathers the bundles' episode returns, decides when the job is solved, and answers STOP.

Wire format (the core's protocol): bundle -> server a PUSH header (``version`` of the ``theta`` used,
``step`` = env steps since the last push) with the payload ``[returns (at most 32), gradient]`` -- the
number of returns is the payload's length minus the model's size; server -> bundle a PARAMS header
(``version``, ``flag`` :attr:`~distlearn.comm.paramserver.ReplyFlag.STOP` on the last reply) with ``theta``.
The server's policy is :class:`GorilaServer`. Where we differ: one server rank (the paper shards theta over
many), Adam instead of AdaGrad, Huber loss, gradient-norm clipping at 10 x ``--max-grad-norm`` and double
DQN as in later DQNs, and an epsilon schedule far shorter than the paper's Atari one. Defaults (measured on
CartPole-v1 in docs/rl.md): ``--lr`` 2.5e-4 (CleanRL's), decayed linearly to 0 over ``--total-steps`` env
steps of all bundles together (``--no-anneal-lr`` keeps it constant), ``--batch-size`` 128,
``--buffer-size`` 100000 per shard, ``--train-every`` 2, ``--target-every`` 250 server versions, epsilon 1
-> 0.01 over 10000 steps per actor. A smaller shard (CleanRL's 10000) forgets the failures once the policy
is good and the returns collapse; a larger ``--lr`` (1e-3) oscillated between 150 and 450.

Timers (perf_counter, a few per gradient): the server's summary record carries ``server_busy_s`` (handling
pushes: receive, Adam, reply) and its fraction of the server's run; each bundle writes
``OUT/gorila-bundle<rank>.json`` with its time blocked on the server's reply and its time learning.

Failure: a bundle that dies is simply no longer heard from; the server goes on with the others (a receive
from any source) and stops when none has sent anything for ``--timeout`` seconds. A bundle whose server is
gone fails with a CommError within ``--timeout``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distlearn.comm.p2p import REQUEST, Header, Kind, Transport
from distlearn.comm.paramserver import ReplyFlag, ServerLink, ServingLoop, StalenessBook
from distlearn.errors import CommError, ConfigError
from distlearn.launch import in_torchrun, init_distributed, shutdown
from distlearn.optim import Adam
from distlearn.rl.common import (
    EnvPool,
    EpisodeStats,
    QNetwork,
    RLMetrics,
    flat_parameters,
    load_flat_parameters,
    save_policy,
    solved_threshold,
)
from distlearn.rl.config import RLConfig, resolve

__all__ = ["GorilaServer", "ReplayShard", "run_gorila"]

RETURN_SLOTS = 32  # episode returns carried by one push at most (the rest go with the next)


class ReplayShard:
    """One actor's replay memory: a ring buffer of the last ``capacity`` transitions, sampled uniformly.

    ``add`` overwrites the oldest transition once full (first in, first out); ``sample(n)`` draws ``n``
    indices uniformly with replacement from the stored ones, with the shard's own seeded generator.
    """

    def __init__(self, capacity: int, obs_dim: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ConfigError(
                f"replay capacity must be at least 1, got {capacity}; use e.g. --buffer-size 50000"
            )
        self.capacity = capacity
        self.obs = torch.zeros(capacity, obs_dim)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity)
        self.dones = torch.zeros(capacity)
        self.size = 0
        self.added = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs: torch.Tensor, action: int, reward: float, next_obs: torch.Tensor, done: float) -> None:
        slot = self.added % self.capacity
        self.obs[slot], self.actions[slot], self.rewards[slot] = obs, action, reward
        self.next_obs[slot], self.dones[slot] = next_obs, done
        self.added += 1
        self.size = min(self.size + 1, self.capacity)

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        if self.size == 0:
            raise ConfigError(
                "cannot sample from an empty replay shard; wait for --learning-starts transitions"
            )
        return torch.randint(self.size, (batch_size,), generator=self.generator)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``(obs, actions, rewards, next_obs, dones)`` of ``batch_size`` uniformly drawn transitions."""
        i = self.sample_indices(batch_size)
        return self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.dones[i]


def run_gorila(config: RLConfig, *, fail_rank: int | None = None) -> dict[str, Any]:
    """Run this rank's role (rank 0: parameter server; others: actor/replay/learner bundles).

    ``fail_rank`` (for tests) makes that bundle exit with code 3 after its first gradient.
    """
    config = resolve(config, "gorila")
    if not in_torchrun():
        raise ConfigError(
            "gorila runs as a torchrun job of R + 1 ranks: use `distlearn rl gorila --workers R`"
        )
    context = init_distributed(timeout_s=config.timeout)
    if context.world_size < 2:
        raise ConfigError("gorila needs a parameter server and at least one bundle: run with 2 or more ranks")
    torch.set_num_threads(1)
    out = Path(config.out or "runs/rl-gorila")
    try:
        if context.rank == 0:
            return _parameter_server(config, context.world_size, out)
        return _bundle(config, context.rank, context.world_size, out, fail=context.rank == fail_rank)
    finally:
        shutdown()


def _network(config: RLConfig) -> tuple[QNetwork, EnvPool]:
    torch.manual_seed(config.seed)
    envs = EnvPool(config.env, 1, config.seed)
    return QNetwork(envs.obs_dim, envs.num_actions, image_shape=envs.image_shape), envs


def _parameter_server(config: RLConfig, world_size: int, out: Path) -> dict[str, Any]:
    server = GorilaServer(config, world_size, out)
    loop = ServingLoop(Transport(0, timeout_s=config.timeout), range(1, world_size), server,
                       silence_s=config.timeout)  # fmt: skip
    loop.run()
    return server.finish(loop)


class GorilaServer:
    """Gorila's parameter server: the :class:`~distlearn.comm.paramserver.ServerPolicy` of rank 0.

    Each PUSH carries a bundle's new episode returns and env steps (gathered for the solved test and the lr
    schedule) and a DQN gradient: ``eta`` decays linearly to 0 over ``--total-steps`` env steps of all
    bundles (unless ``--no-anneal-lr``), ``theta <- Adam(theta, g)``, the staleness
    (version now - version used) goes to the metrics, and the bundle is answered with the new ``theta``
    -- with STOP, and retired, once the job is solved, out of time or out of env steps.
    """

    def __init__(self, config: RLConfig, world_size: int, out: Path) -> None:
        self.config = config
        self.world_size = world_size
        self.out = out
        self.model, probe = _network(config)
        probe.close()
        self.optimizer = Adam(self.model.parameters(), lr=config.lr, eps_hat=False)
        self.params = list(self.model.parameters())
        self.size = sum(p.numel() for p in self.params)
        self.stats = EpisodeStats(solved_threshold(config.env))
        self.metrics = RLMetrics(
            out,
            rank=0,
            world_size=world_size,
            role="server",
            algorithm="gorila",
            env_id=config.env,
            quiet=config.quiet,
            tensorboard=config.tensorboard,
        )
        self.book = StalenessBook(keep_updates=False)
        self.start = self.last_log = time.perf_counter()
        self.lr = config.lr  # of the last update
        self.lost: list[str] = []
        self.busy_s = 0.0  # time spent handling pushes (receive, Adam step, reply); the rest is waiting

    def on_request(self, loop: ServingLoop, peer: int, header: Header) -> None:
        began = time.perf_counter()
        try:
            self._apply(loop, peer, header)
        finally:
            self.busy_s += time.perf_counter() - began

    def _apply(self, loop: ServingLoop, peer: int, header: Header) -> None:
        config = self.config
        if header.kind != Kind.PUSH or header.length < self.size + 1:
            raise CommError(
                f"gorila server: rank {peer} sent {header.kind.name} of {header.length} numbers; expected a "
                f"PUSH of at least the model's {self.size}: every rank must run the same --env and version"
            )
        payload = loop.receive(peer, header, what="a gradient")
        count = header.length - self.size - 1  # [returns of finished episodes, gradient, loss]
        self.stats.add(payload[:count].tolist(), header.step)
        self.metrics.add_loss(float(payload[-1]))
        if config.anneal_lr:  # eta decays linearly to 0 over --total-steps env steps (all bundles together)
            self.lr = config.lr * max(0.0, 1.0 - self.stats.env_steps / config.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        offset = count  # apply the gradient: theta <- Adam(theta, g)
        for p in self.params:
            p.grad = payload[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        staleness = self.book.staleness(header.version)  # updates applied since the bundle read theta
        self.book.applied([(peer, staleness)])
        self.metrics.add_staleness(staleness)
        finished = (
            (self.stats.solved and config.stop_when_solved)
            or time.perf_counter() - self.start > config.time_limit
            or self.stats.env_steps >= config.total_steps
        )
        flag = int(ReplyFlag.STOP) if finished else 0
        reply = Header(Kind.PARAMS, version=self.book.version, length=self.size, flag=flag, sender=0)
        if not loop.reply(peer, reply, flat_parameters(self.model)):
            return
        if finished:
            loop.retire(peer)
        if time.perf_counter() - self.last_log >= config.log_every:
            self.last_log = time.perf_counter()
            self.metrics.log(self.book.version, self.stats, lr=self.lr, bytes_sent=loop.transport.bytes_sent)

    def after_message(self, loop: ServingLoop) -> None:
        """Nothing waits: each gradient is applied as it arrives."""

    def on_lost(self, loop: ServingLoop, worker: int, why: str) -> None:
        self.lost.append(f"{worker}: {why}")
        print(f"[gorila] bundle {worker} lost ({why}); going on with the others", flush=True)

    def on_silence(self, loop: ServingLoop, error: CommError | None) -> None:
        # every remaining bundle silent for --timeout seconds (or its connection broke): end the job
        why = str(error) if error is not None else f"silent for {self.config.timeout:g} s"
        self.lost.append(f"{sorted(loop.live)}: {why}")
        print(f"[gorila] bundles {sorted(loop.live)} lost ({why}); the server stops", flush=True)

    def finish(self, loop: ServingLoop) -> dict[str, Any]:
        """Log the summary, save the policy and return the run's result."""
        version, stats = self.book.version, self.stats
        seconds = time.perf_counter() - self.start
        summary = self.metrics.log(
            version, stats, kind="summary", lr=self.lr, bytes_sent=loop.transport.bytes_sent,
            lost_bundles=self.lost, server_busy_s=round(self.busy_s, 3),
            server_busy_fraction=round(self.busy_s / max(seconds, 1e-9), 4),
        )  # fmt: skip
        self.metrics.close()
        save_policy(self.out / "policy.pt", self.model, self.config.env, algorithm="gorila", updates=version)
        return {
            "algorithm": "gorila",
            "workers": self.world_size - 1,
            "rank": 0,
            "env_steps": stats.env_steps,
            "updates": version,
            "seconds": seconds,
            "solved_env_steps": stats.solved_at[0] if stats.solved_at else None,
            "solved_seconds": stats.solved_at[1] if stats.solved_at else None,
            "final_return": stats.mean_return,
            "env_steps_per_s": summary.samples_per_s,
            "lost_bundles": self.lost,
            "server_busy_s": self.busy_s,
        }


def _bundle(config: RLConfig, rank: int, world_size: int, out: Path, *, fail: bool) -> dict[str, Any]:
    online, _ = _network(config)
    envs = EnvPool(config.env, 1, config.seed, first_index=rank)
    target = QNetwork(envs.obs_dim, envs.num_actions, image_shape=envs.image_shape)
    target.load_state_dict(online.state_dict())
    replay = ReplayShard(config.buffer_size, envs.obs_dim, seed=config.seed * 1000 + rank)
    explore = np.random.default_rng(config.seed * 1000 + rank)
    size = sum(p.numel() for p in online.parameters())
    transport = Transport(rank, timeout_s=config.timeout)
    link = ServerLink(transport, 0, size)
    version, target_epoch, steps, unsent_steps = 0, 0, 0, 0
    unsent_returns: list[float] = []
    pending: Any = None  # the receive of theta in flight
    began, waited, learning, gradients = time.perf_counter(), 0.0, 0.0, 0  # timers for the run's summary

    def refused(header: Header) -> Exception:
        return ConfigError(f"the gorila server refused bundle {rank}: every rank must build the same --env")

    while True:
        # actor: epsilon-greedy, epsilon decaying linearly from eps_start to eps_end
        epsilon = max(
            config.eps_end,
            config.eps_start - (config.eps_start - config.eps_end) * steps / config.eps_decay_steps,
        )
        obs = envs.obs[0]
        if explore.random() < epsilon:
            action = int(explore.integers(envs.num_actions))
        else:
            with torch.no_grad():
                action = int(online(obs[None]).argmax(-1))
        before = obs.clone()
        _, reward, _ = envs.step(torch.tensor([action]))
        # only a terminal state ends the bootstrap: at a time-limit truncation the target still bootstraps
        # from the state reached (final_obs, before the pool's reset), as CleanRL's dqn.py does
        replay.add(before, action, float(reward[0]), envs.final_obs[0], float(envs.terminated[0]))
        steps += 1
        unsent_steps += 1
        unsent_returns += envs.finished_returns
        if len(replay) < config.learning_starts or steps % config.train_every:
            continue
        if pending is not None:  # the reply to the previous gradient (newest theta, maybe STOP) came in
            # while the actor acted; read before the gradient is computed, so that gradient is fresh
            asked = time.perf_counter()
            answer = link.receive(pending, refused)
            waited += time.perf_counter() - asked
            pending = None
            version = answer.version
            # a copy: vector_to_parameters makes the parameters views of its input, and the next receive
            # reuses the link's buffer, which would change the weights while a gradient is being computed
            load_flat_parameters(online, link.flat.clone())
            if version // config.target_every != target_epoch:  # theta^- <- theta every target_every updates
                target_epoch = version // config.target_every
                target.load_state_dict(online.state_dict())
            if answer.flag & ReplyFlag.STOP:
                break
        # learner: the DQN gradient on a minibatch of this bundle's shard, at the newest theta it has
        learn_began = time.perf_counter()
        states, actions, rewards, next_states, dones = replay.sample(config.batch_size)
        with torch.no_grad():
            if config.double_q:  # van Hasselt et al. 2016: the online network picks a', the target rates it
                best = online(next_states).argmax(-1, keepdim=True)
                next_q = target(next_states).gather(-1, best).squeeze(-1)
            else:
                next_q = target(next_states).max(-1).values
            y = rewards + config.gamma * (1 - dones) * next_q
        q = online(states).gather(-1, actions[:, None]).squeeze(-1)
        loss = F.smooth_l1_loss(q, y)
        online.zero_grad()
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(online.parameters(), 10.0 * config.max_grad_norm)
        sent_returns, unsent_returns = unsent_returns[:RETURN_SLOTS], unsent_returns[RETURN_SLOTS:]
        gradient = [p.grad.reshape(-1) for p in online.parameters()]
        # the episodes' returns, the gradient, and its loss last (the server logs the loss)
        payload = torch.cat(
            [torch.tensor(sent_returns, dtype=torch.float32), *gradient, loss.detach().reshape(1)]
        )
        header = Header(Kind.PUSH, version=version, step=unsent_steps, length=payload.numel(), sender=rank)
        unsent_steps = 0
        transport.send(0, header, payload, tag=REQUEST)
        learning += time.perf_counter() - learn_began
        gradients += 1
        if fail:
            import os

            os._exit(3)
        # the actor goes on acting while the server applies this gradient; its reply is read before the next
        # gradient is computed (one gradient in flight per bundle)
        pending = link.post(f"bundle {rank} receiving theta")
    envs.close()
    timers = {
        "rank": rank,
        "env_steps": steps,
        "gradients": gradients,
        "seconds": round(time.perf_counter() - began, 3),
        "reply_wait_s": round(waited, 3),  # blocked on the server's reply (theta) before a gradient
        "learn_s": round(learning, 3),  # sampling, the gradient and its send
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gorila-bundle{rank}.json").write_text(json.dumps(timers) + "\n")
    return {"algorithm": "gorila", "workers": world_size - 1, **timers}
