"""Typed configuration of ``distlearn rl``: the common options, and one options dataclass per algorithm.

:class:`RLConfig` holds what every algorithm takes (environment, workers, seed, budget, learning rate,
output, checkpoints) and, in ``options``, the algorithm's own options: :class:`SyncPGOptions`,
:class:`NaiveOptions`, :class:`A3COptions` or :class:`GorilaOptions` (:data:`OPTIONS` maps the algorithm's
name to its class). A docstring under each field is its ``--help``. ``config.num_envs`` reads
``config.options.num_envs``, so the algorithm code reads every setting as ``config.NAME``.

:func:`config_for` builds a config from one flat mapping (the common keys and the algorithm's) and refuses
an option of another algorithm, naming the algorithm it belongs to; :func:`from_file_values` reads a config
file's mapping (common keys, the algorithm's keys flat or in an ``[a3c]``-style table); :func:`resolve`
fills in the algorithm's defaults and validates (bad values raise ConfigError). The defaults are the ones
measured in docs/rl.md on CartPole-v1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from distlearn.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "COMMON",
    "OPTIONS",
    "A3COptions",
    "GorilaOptions",
    "NaiveOptions",
    "PolicyGradientOptions",
    "RLConfig",
    "SyncPGOptions",
    "config_for",
    "flat_values",
    "foreign_option",
    "from_file_values",
    "owners",
    "refuse_foreign",
    "resolve",
]

ALGORITHMS = ("naive", "a3c", "gorila", "sync-pg")

_LR = {"sync-pg": 2.5e-3, "naive": 2.5e-3, "a3c": 2e-3, "gorila": 2.5e-4}
_TOTAL_STEPS = {"sync-pg": 200_000, "naive": 200_000, "a3c": 300_000, "gorila": 400_000}


@dataclass
class PolicyGradientOptions:
    """The options of the PPO/A2C learners (sync-pg and naive)."""

    algo: Literal["ppo", "a2c"] = "ppo"
    """the update: ppo (clipped surrogate, epochs of minibatches) or a2c (one step per rollout)"""
    num_envs: int = 4
    """environments per worker"""
    rollout_steps: int = 128
    """steps per environment between updates"""
    gae_lambda: float = 0.95
    """GAE lambda (1.0 = n-step returns)"""
    ppo_epochs: int = 4
    """PPO: passes over each batch"""
    minibatches: int = 4
    """PPO: minibatches per pass (must divide --rollout-steps)"""
    clip: float = 0.2
    """PPO: ratio clip epsilon"""
    entropy_coef: float = 0.01
    """entropy bonus beta"""
    value_coef: float = 0.5
    """value loss weight"""


@dataclass
class SyncPGOptions(PolicyGradientOptions):
    """``distlearn rl sync-pg``: R replicas roll out, gradients allreduced (synchronous A2C/PPO)."""

    reducer: str = "ring"
    """allreduce algorithm (backend, ring, tree, rabenseifner, segmented-ring, shm, hierarchical, auto)"""


@dataclass
class NaiveOptions(PolicyGradientOptions):
    """``distlearn rl naive``: R rollout workers send trajectories to one learner, which broadcasts theta."""


@dataclass
class A3COptions:
    """``distlearn rl a3c``: asynchronous advantage actor-critic, R actor-learners on shared weights."""

    servers: int = 0
    """0 = shared memory on one machine; S >= 1 = theta and RMSProp on S parameter-server ranks"""
    num_envs: int = 4
    """environments per actor-learner"""
    rollout_steps: int = 10
    """t_max: steps per environment between updates"""
    entropy_coef: float = 0.01
    """entropy bonus beta"""
    value_coef: float = 0.5
    """value loss weight"""


@dataclass
class GorilaOptions:
    """``distlearn rl gorila``: distributed DQN, 1 parameter server + R actor/replay/learner bundles."""

    buffer_size: int = 100_000
    """replay capacity per shard"""
    batch_size: int = 128
    """minibatch per learner update"""
    learning_starts: int = 1_000
    """transitions in a shard before its learner starts"""
    target_every: int = 250
    """parameter-server updates between target-network refreshes"""
    train_every: int = 2
    """actor steps per learner update"""
    eps_start: float = 1.0
    """initial epsilon"""
    eps_end: float = 0.01
    """final epsilon"""
    eps_decay_steps: int = 10_000
    """actor steps over which epsilon decays linearly"""
    double_q: bool = True
    """double DQN targets (the online network picks the next action)"""


OPTIONS: dict[str, type] = {
    "naive": NaiveOptions,
    "a3c": A3COptions,
    "gorila": GorilaOptions,
    "sync-pg": SyncPGOptions,
}


@dataclass
class RLConfig:
    """Settings of a ``distlearn rl`` run: the options every algorithm takes, and the algorithm's own."""

    env: str = "CartPole-v1"
    """gymnasium id (CartPole-v1, Acrobot-v1, MinAtar/Breakout-v1 with minatar)"""
    workers: int = 1
    """R: rollout workers (naive), actor-learners (a3c), bundles (gorila), replicas (sync-pg)"""
    seed: int = 1
    """random seed; worker k's environments use seed + their global index"""
    total_steps: int | None = None
    """stop after this many environment steps, all workers together (None: the algorithm's, sync-pg and naive
    200000, a3c 300000, gorila 400000)"""
    lr: float | None = None
    """learning rate (None: the algorithm's, sync-pg and naive 2.5e-3 (Adam), a3c 2e-3 (RMSProp), gorila
    2.5e-4 (Adam))"""
    gamma: float = 0.99
    """discount gamma"""
    max_grad_norm: float = 0.5
    """gradient norm clip (0 = none; gorila clips at 10 times this)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_steps"""
    time_limit: float = 600.0
    """stop after this many seconds of training"""
    stop_when_solved: bool = True
    """stop when the mean return of the last 100 episodes reaches the threshold"""
    timeout: float = 60.0
    """seconds any receive/collective may wait before the run fails (dead peers)"""
    out: str | None = None
    """run directory: metrics.jsonl, summary.json, policy.pt, checkpoints/ (None: runs/rl-ALGORITHM)"""
    log_every: float = 2.0
    """seconds between metric records"""
    quiet: bool = False
    """no progress lines"""
    tensorboard: Literal["auto", "on", "off"] = "auto"
    """TensorBoard events in OUT/tensorboard (auto: if installed)"""
    checkpoint_every: int = 0
    """save a checkpoint in OUT/checkpoints every N updates (0: none; sync-pg, naive, a3c without servers)"""
    resume: str | None = None
    """checkpoint file, or directory (its newest), to resume from (sync-pg, naive, a3c without servers)"""
    overwrite: bool = False
    """replace an earlier run in OUT (its metrics, summary and checkpoints); without it such an OUT is
    refused unless --resume"""
    options: Annotated[Any, tyro.conf.Suppress] = field(default_factory=SyncPGOptions)
    """the algorithm's own options (:data:`OPTIONS`); their type says which algorithm runs"""

    def __getattr__(self, name: str) -> Any:  # only called when the normal lookup fails
        if name == "options" or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self.options, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self.options).__name__} has no option {name!r} (an option of "
                f"{' / '.join(owners(name)) or 'no algorithm'})"
            ) from None

    @property
    def algorithm(self) -> str:
        """The algorithm whose options ``options`` are."""
        for name, cls in OPTIONS.items():
            if type(self.options) is cls:
                return name
        raise ConfigError(f"{type(self.options).__name__} is not the options of a distlearn rl algorithm")


COMMON = tuple(f.name for f in dataclasses.fields(RLConfig) if f.name != "options")
"""The names of the options every algorithm takes."""


def _option_names(algorithm: str) -> set[str]:
    return {f.name for f in dataclasses.fields(_options_class(algorithm))}


def _options_class(algorithm: str) -> type:
    if algorithm not in OPTIONS:
        raise ConfigError(f"unknown RL algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    return OPTIONS[algorithm]


def owners(name: str) -> list[str]:
    """The algorithms whose own options include ``name``."""
    return [algorithm for algorithm in ALGORITHMS if name in _option_names(algorithm)]


def foreign_option(option: str, belongs: list[str], algorithm: str, where: str = "") -> ConfigError:
    """The error for ``option`` (a flag) of the algorithms ``belongs`` given to ``algorithm``."""
    return ConfigError(
        f"{where}{option} is an option of {' / '.join(belongs)}, not of {algorithm}; drop it, "
        f"or run `distlearn rl {belongs[0]}`"
    )


def refuse_foreign(algorithm: str, names: Any, *, source: str = "") -> None:
    """ConfigError for an option ``algorithm`` does not take, naming the algorithm(s) it belongs to."""
    mine = set(COMMON) | _option_names(algorithm)
    where = f"{source}: " if source else ""
    for name in names:
        if name in mine:
            continue
        option = "--" + name.replace("_", "-")
        belongs = owners(name)
        if belongs:
            raise foreign_option(option, belongs, algorithm, where)
        known = ", ".join(sorted("--" + n.replace("_", "-") for n in mine))
        raise ConfigError(f"{where}unknown option {option} for {algorithm}; its options are: {known}")


def config_for(algorithm: str, values: dict[str, Any] | None = None, **kwargs: Any) -> RLConfig:
    """``algorithm``'s config from one flat mapping (and keywords); another algorithm's option is refused."""
    values = {**(values or {}), **kwargs}
    refuse_foreign(algorithm, values)
    options = _options_class(algorithm)(**{k: v for k, v in values.items() if k not in COMMON})
    return RLConfig(**{k: v for k, v in values.items() if k in COMMON}, options=options)


def from_file_values(algorithm: str, values: dict[str, Any], *, source: str) -> RLConfig:
    """A config from a config file's mapping: common keys, the algorithm's keys flat or in its table.

    ``[sync-pg]``, ``[a3c]``, ... tables: the one named after ``algorithm`` applies, the others are ignored
    (one file can serve every algorithm); a flat key of another algorithm is refused.
    """
    values = dict(values)
    tables = {name: values.pop(name.replace("-", "_"), None) for name in ALGORITHMS}
    table = tables[algorithm] or {}
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{algorithm}] must be a table of {algorithm} options")
    refuse_foreign(algorithm, values, source=source)
    own = _option_names(algorithm)
    for key in table:
        if key not in own:
            raise ConfigError(
                f"{source}: [{algorithm}] has no option {key!r}"
                + (f" (an option of {' / '.join(owners(key))})" if owners(key) else "")
                + f"; it has: {', '.join(sorted(own))}"
            )
    return config_for(algorithm, {**values, **table})


def flat_values(config: RLConfig) -> dict[str, Any]:
    """The config as one flat mapping of every common and own option (what :func:`config_for` reads)."""
    values = {name: getattr(config, name) for name in COMMON}
    values.update(dataclasses.asdict(config.options))
    return values


def resolve(config: RLConfig, algorithm: str) -> RLConfig:
    """``config`` with the algorithm's defaults filled in, validated (bad values raise ConfigError)."""
    cls = _options_class(algorithm)
    if type(config.options) is not cls:
        raise ConfigError(
            f"{algorithm} takes {cls.__name__}, got {type(config.options).__name__}; build the config with "
            f"config_for({algorithm!r}, ...)"
        )
    config = dataclasses.replace(
        config,
        lr=_LR[algorithm] if config.lr is None else config.lr,
        total_steps=_TOTAL_STEPS[algorithm] if config.total_steps is None else config.total_steps,
    )
    c: Any = config
    checks = [
        ("workers", c.workers >= 1, "use --workers 1 or more"),
        ("timeout", c.timeout > 0, "use e.g. --timeout 60"),
        ("total_steps", c.total_steps >= 1, "use e.g. --total-steps 200000"),
        ("lr", c.lr > 0, "use e.g. --lr 1e-3"),
        ("gamma", 0 <= c.gamma <= 1, "use e.g. --gamma 0.99"),
        ("checkpoint_every", c.checkpoint_every >= 0, "use --checkpoint-every 0 (none) or N >= 1 updates"),
    ]
    asynchronous = algorithm == "gorila" or (algorithm == "a3c" and c.servers)
    if asynchronous and (c.checkpoint_every or c.resume is not None):
        where = "a3c --servers" if algorithm == "a3c" else "gorila"
        raise ConfigError(
            f"{where} does not checkpoint or resume (its state lives on server and bundle ranks that no "
            "checkpoint collects); drop --checkpoint-every/--resume, or use sync-pg, naive or a3c on "
            "shared memory (--servers 0)"
        )
    if hasattr(c.options, "num_envs"):
        checks += [
            ("num_envs", c.num_envs >= 1, "use --num-envs 1 or more"),
            ("rollout_steps", c.rollout_steps >= 1, "use --rollout-steps 1 or more"),
        ]
    if isinstance(c.options, PolicyGradientOptions):
        checks += [
            ("gae_lambda", 0 <= c.gae_lambda <= 1, "use e.g. --gae-lambda 0.95"),
            ("algo", c.algo in ("ppo", "a2c"), "use --algo ppo or --algo a2c"),
            (
                "minibatches",
                c.minibatches >= 1 and c.rollout_steps % c.minibatches == 0,
                "--minibatches must divide --rollout-steps (PPO splits the rollout's time steps)",
            ),
        ]
    if isinstance(c.options, A3COptions):
        checks.append(("servers", c.servers >= 0, "use --servers 0 (shared memory) or S >= 1 server ranks"))
    if isinstance(c.options, GorilaOptions):
        checks.append(
            (
                "batch_size",
                c.batch_size >= 1 and c.buffer_size >= c.batch_size,
                "--buffer-size must hold at least one --batch-size",
            )
        )
    for name, ok, fix in checks:
        if not ok:
            raise ConfigError(f"bad --{name.replace('_', '-')} {getattr(c, name)!r}: {fix}")
    return config
