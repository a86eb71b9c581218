"""Stragglers and the simulated clock: a seeded delay at the start of a rank's steps, and the time it costs.

Chen et al. (2016) motivate backup workers by stragglers: a few replicas much slower than the rest, which
a synchronous step must wait for. ``--straggler RANK:DELAY_MS`` (repeatable) sleeps ``DELAY_MS`` at the
start of every step of rank ``RANK``; ``--straggler-dist`` adds a random delay to every training rank's
steps, drawn per (seed, rank, step) so two runs with one seed sleep the same::

    exp:MEAN_MS                 exponential with mean MEAN_MS (a long tail: the usual straggler model)
    lognormal:MEDIAN_MS:SIGMA   exp(N(ln MEDIAN_MS, SIGMA^2)) ms
    uniform:LO_MS:HI_MS         uniform on [LO_MS, HI_MS]

**The simulated clock.** Where processes outnumber the cores (R = 8 on 2 cores), wall time says more about
the scheduler than about the method. Each rank therefore keeps a clock that adds, per step, the CPU time its
process spent in the step (``time.process_time``: compute, without the time it waited for peers or for a
core) and the delay it was given. When a step made every replica wait for every other (an allreduce:
:meth:`distlearn.parallel.Strategy.waits_for_all`), the clocks are replaced by their maximum, so a
synchronous step lasts as long as its slowest replica, as on a machine with a core per process. An
asynchronous worker (parameter server, Hogwild!, asynchronous EASGD) keeps its own clock: it waits for
nobody. The clock is kept with stragglers, or with ``--sim-clock`` alone; eval and train records then carry
``extra["sim_time_s"]`` and each rank's summary ``sim_time_s``, ``straggler_delay_s`` (the delay it was
given in total) and ``compute_cpu_s``.

``--straggler-sleep-scale k`` sleeps ``k`` times each delay while the clock counts it once: with ``k``
processes per core a step takes about ``k`` times its CPU time in wall time, and ``k`` keeps the straggler as
far behind its peers in wall time (which decides the order of asynchronous pushes) as on the clock.

*Limits:* the sleep is real (the straggler really is slower in wall time, and an asynchronous run's
staleness comes from the real order of pushes, on a loaded machine); a parameter server's synchronous
groups (``--softsync R``, backup workers) wait at the server, which keeps no clock: their workers' clocks
are their own (benchmarks/straggler_bench.py replays those from the recorded delays and compute times).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from distlearn.errors import ConfigError

__all__ = [
    "DISTRIBUTIONS",
    "SimClock",
    "check_stragglers",
    "clock_wanted",
    "draw_delay_ms",
    "parse_distribution",
    "parse_stragglers",
    "step_delay_ms",
]

DISTRIBUTIONS = {"exp": 1, "lognormal": 2, "uniform": 2}
"""The ``--straggler-dist`` families and how many numbers follow the name."""


def parse_stragglers(specs: Sequence[str]) -> dict[int, float]:
    """``("1:50", "3:20.5")`` -> ``{1: 50.0, 3: 20.5}`` (milliseconds; a rank named twice adds up)."""
    delays: dict[int, float] = {}
    for spec in specs:
        rank_text, sep, delay_text = str(spec).partition(":")
        try:
            rank, delay = int(rank_text), float(delay_text)
        except ValueError:
            rank, delay = -1, math.nan
        if not sep or rank < 0 or not math.isfinite(delay) or delay < 0:
            raise ConfigError(
                f"--straggler {spec!r}: give RANK:DELAY_MS with a rank >= 0 and a delay >= 0 ms, e.g. 1:50"
            )
        delays[rank] = delays.get(rank, 0.0) + delay
    return delays


def parse_distribution(spec: str) -> tuple[str, tuple[float, ...]] | None:
    """``"exp:20"`` -> ``("exp", (20.0,))``; ``"none"`` -> None; ConfigError naming the forms otherwise."""
    if spec in ("", "none"):
        return None
    name, *rest = str(spec).split(":")
    forms = "exp:MEAN_MS, lognormal:MEDIAN_MS:SIGMA or uniform:LO_MS:HI_MS (or none)"
    try:
        numbers = tuple(float(x) for x in rest)
    except ValueError:
        numbers = ()
    if name not in DISTRIBUTIONS or len(numbers) != DISTRIBUTIONS[name]:
        raise ConfigError(f"--straggler-dist {spec!r}: use {forms}, e.g. exp:20")
    ordered = name != "uniform" or numbers[0] <= numbers[1]
    if not all(math.isfinite(x) and x >= 0 for x in numbers) or not ordered:
        raise ConfigError(f"--straggler-dist {spec!r}: the numbers must be >= 0 (and LO <= HI); {forms}")
    return name, numbers


def draw_delay_ms(spec: str, seed: int, rank: int, step: int) -> float:
    """The random delay of ``rank``'s step ``step`` in ms: a function of its arguments only (reproducible,
    and the same after a resume)."""
    parsed = parse_distribution(spec)
    if parsed is None:
        return 0.0
    name, numbers = parsed
    draw = random.Random(f"distlearn-straggler:{seed}:{rank}:{step}")  # a str seed: hashed, not salted
    if name == "exp":
        return draw.expovariate(1.0 / numbers[0]) if numbers[0] > 0 else 0.0
    if name == "lognormal":
        return draw.lognormvariate(math.log(numbers[0]), numbers[1]) if numbers[0] > 0 else 0.0
    return draw.uniform(numbers[0], numbers[1])


def step_delay_ms(config: Any, rank: int, step: int) -> float:
    """The whole delay of ``rank``'s step ``step`` under ``config``: its fixed one plus the drawn one."""
    fixed = parse_stragglers(config.straggler).get(rank, 0.0)
    return fixed + draw_delay_ms(config.straggler_dist, config.seed, rank, step)


def check_stragglers(config: Any, processes: int, idle_ranks: Sequence[int] = ()) -> None:
    """ConfigError, before any process starts, for a straggler rank the job does not have or that does not
    train (``idle_ranks``: e.g. the parameter servers)."""
    delays = parse_stragglers(config.straggler)
    parse_distribution(config.straggler_dist)
    for rank in sorted(delays):
        if rank >= processes:
            raise ConfigError(
                f"--straggler {rank}:...: the job has ranks 0..{processes - 1}; name one of them"
            )
        if rank in idle_ranks:
            raise ConfigError(
                f"--straggler {rank}:...: rank {rank} does not run training steps (a server); "
                f"name a worker rank ({', '.join(str(r) for r in range(processes) if r not in idle_ranks)})"
            )


def clock_wanted(config: Any) -> bool:
    """True when the run keeps the simulated clock: stragglers, a delay distribution, or ``--sim-clock``."""
    return bool(config.straggler) or config.straggler_dist not in ("", "none") or bool(config.sim_clock)


class SimClock:
    """This rank's delays and simulated clock; :meth:`begin` and :meth:`end` bracket each step."""

    def __init__(self, config: Any, strategy: Any) -> None:
        self.config, self.strategy = config, strategy
        self.active = clock_wanted(config)
        self.fixed_ms = parse_stragglers(config.straggler).get(strategy.rank, 0.0)
        self.seconds = 0.0  # the simulated clock
        self.delay_s = 0.0  # delays given in total (the sleep is --straggler-sleep-scale times it)
        self.compute_s = 0.0  # CPU time of the steps in total
        self._cpu = 0.0
        self._delay = 0.0

    def begin(self, step: int) -> None:
        """Sleep this step's delay (the step starts late) and note the CPU time."""
        if not self.active:
            return
        drawn = draw_delay_ms(self.config.straggler_dist, self.config.seed, self.strategy.rank, step)
        ms = self.fixed_ms + drawn
        self._delay = ms / 1000.0
        if self._delay > 0:
            time.sleep(self._delay * self.config.straggler_sleep_scale)
        self._cpu = time.process_time()

    def end(self, step: int) -> None:
        """Add the step's CPU time and delay; the slowest replica's clock after a step that waited for all."""
        if not self.active:
            return
        cpu = max(0.0, time.process_time() - self._cpu)
        self.compute_s += cpu
        self.delay_s += self._delay
        self.seconds += cpu + self._delay
        if self.strategy.waits_for_all(step):
            clock = torch.tensor([self.seconds], dtype=torch.float64, device=self.strategy.device)
            torch.distributed.all_reduce(clock, op=torch.distributed.ReduceOp.MAX)
            self.seconds = float(clock.item())

    def fields(self) -> dict[str, Any]:
        """What a train or eval record carries (nothing when the clock is off)."""
        return {"sim_time_s": self.seconds} if self.active else {}

    def summary(self) -> dict[str, Any]:
        """What the rank's summary carries."""
        if not self.active:
            return {}
        return {
            "sim_time_s": self.seconds,
            "straggler_delay_s": self.delay_s,
            "compute_cpu_s": self.compute_s,
        }

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds, "delay_s": self.delay_s, "compute_s": self.compute_s}

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        if state:
            self.seconds, self.delay_s = float(state["seconds"]), float(state["delay_s"])
            self.compute_s = float(state["compute_s"])
