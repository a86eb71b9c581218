"""``distlearn rl {naive,a3c,gorila,sync-pg,play}``: distributed reinforcement learning from the command line.

    distlearn rl sync-pg --env CartPole-v1 --workers 2          # R replicas, gradients allreduced
    distlearn rl a3c --env CartPole-v1 --workers 2              # R actor-learners on shared memory
    distlearn rl a3c --env CartPole-v1 --workers 2 --servers 1  # ... the shared model on a server rank
    distlearn rl naive --env CartPole-v1 --workers 2            # R rollout workers + 1 learner rank
    distlearn rl gorila --env CartPole-v1 --workers 2           # 1 parameter server + R actor/learner bundles
    distlearn rl play runs/rl-sync-pg/policy.pt --gif docs/img/rl-cartpole.gif

``--workers R`` on one machine starts torchrun on 127.0.0.1 (R ranks for sync-pg, R + 1 for naive and
gorila, R + S for a3c with ``--servers S``); A3C without servers uses ``torch.multiprocessing``. Every
run writes ``OUT/metrics.jsonl`` (distlearn's metrics records) and ``OUT/policy.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from distlearn import config as config_tools
from distlearn.launch import ENV_LAUNCHED, in_torchrun, launch_local
from distlearn.rl.config import ALGORITHMS, RLConfig

__all__ = ["add_arguments", "main", "run", "run_algorithm", "to_argv"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="rl_command", metavar="ALGORITHM", required=True)
    helps = {
        "naive": "R rollout workers send trajectories to one learner, which broadcasts new weights",
        "a3c": "asynchronous advantage actor-critic: R actor-learners on shared-memory weights",
        "gorila": "distributed DQN: actors, sharded replay, learners and a parameter server",
        "sync-pg": "synchronous A2C/PPO: every worker rolls out, gradients allreduced",
    }
    for name in ALGORITHMS:
        algorithm = sub.add_parser(name, help=helps[name], description=helps[name])
        config_tools.add_arguments(algorithm, RLConfig)
    play = sub.add_parser("play", help="run a saved policy, print returns, optionally render a GIF")
    play.add_argument("policy", help="policy.pt written by a distlearn rl run")
    play.add_argument("--episodes", type=int, default=5, help="episodes to run (default: %(default)s)")
    play.add_argument("--gif", default=None, help="write the first episode as an animated GIF here")
    play.add_argument("--max-frames", type=int, default=500, help="frames in the GIF (default: %(default)s)")
    play.add_argument("--seed", type=int, default=0, help="environment seed (default: %(default)s)")


def to_argv(config: RLConfig) -> list[str]:
    """Command-line flags that rebuild ``config`` (for the workers the launcher starts)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + field.name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _processes(name: str, workers: int, servers: int = 0) -> int:
    return workers + 1 if name in ("naive", "gorila") else workers + servers


def run(args: argparse.Namespace) -> int:
    if args.rl_command == "play":
        from distlearn.rl.play import play

        returns = play(
            args.policy, episodes=args.episodes, gif=args.gif, max_frames=args.max_frames, seed=args.seed
        )
        print(f"returns over {len(returns)} episodes: {returns} (mean {sum(returns) / len(returns):.1f})")
        return 0
    name = args.rl_command
    config = config_tools.from_args(RLConfig, args)
    if config.out is None:
        config = dataclasses.replace(config, out=f"runs/rl-{name}")
    nproc = _processes(name, config.workers, config.servers)
    if (name != "a3c" or config.servers) and not in_torchrun() and (nproc > 1 or name in ("naive", "gorila")):
        if os.environ.get(ENV_LAUNCHED):
            raise RuntimeError("a launched worker tried to launch workers")  # never happens via the CLI
        # the workers run this module directly, so the same command works before and after registration
        program = ["distlearn.rl.cli", name, *to_argv(config)]
        return launch_local(
            program, nproc, timeout_s=config.time_limit + 5 * config.timeout + 60, threads_per_worker=1
        )
    summary = run_algorithm(name, config)
    if summary.get("main", summary.get("rank", 0) == 0):  # one summary per job (a3c --servers: a worker's)
        print(json.dumps(summary), file=sys.stderr)
    return 0


def run_algorithm(name: str, config: RLConfig) -> dict[str, Any]:
    """Run algorithm ``name`` in this process (one rank of a torchrun job, or the A3C parent)."""
    if name == "sync-pg":
        from distlearn.rl.sync_pg import run_sync_pg

        return run_sync_pg(config)
    if name == "a3c":
        from distlearn.rl.a3c import run_a3c

        return run_a3c(config)
    if name == "naive":
        from distlearn.rl.naive import run_naive

        return run_naive(config)
    from distlearn.rl.gorila import run_gorila

    return run_gorila(config)


def main(argv: list[str] | None = None) -> int:
    """``python -m distlearn.rl.cli ALGORITHM ...``: the same as ``distlearn rl ALGORITHM ...``."""
    from distlearn.errors import DistlearnError

    parser = argparse.ArgumentParser(prog="distlearn rl", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DistlearnError as error:
        print(f"distlearn rl: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
