"""``distlearn live --demo``: train several strategies side by side on Fashion-MNIST and watch them live.

The demo starts one ``distlearn train`` per strategy, all on the same work (the same model, data subset,
global batch, number of steps and seed), each in its own run directory under ``OUT/<strategy>`` and in its
own process group, and the dashboard shows them as they train. By default the demo runs
:data:`DEFAULT_STRATEGIES` (synchronous allreduce SGD, the parameter server and Hogwild!), those of them
registered in :data:`distlearn.parallel.STRATEGIES`; ``--strategies`` picks any registered ones, ``all``
every one. :data:`DEMO_WORKERS` gives each its number of processes, 2 for one not listed.

Stopping: Ctrl-C or the server's exit calls :meth:`DemoLauncher.stop`. It
sends SIGINT to each run's process group (``distlearn train`` then stops the torchrun job it launched, in
its own session, see :func:`distlearn.launch.launch_local`), waits, and kills with SIGKILL every process of
the run's tree (recorded with psutil before the interrupt) that is still alive after the grace period.

The budget is deliberately small (a 2-core machine runs all of them at once): with the defaults each run
takes 300 steps of a global batch of 64 on a 12,000-image subset, logging every 5 steps and evaluating on
2,000 test images every 50 steps: sync, ps and hogwild together end about 80 s after the start on two cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distlearn.errors import ConfigError, require_extra

__all__ = [
    "DEFAULT_STRATEGIES",
    "DEMO_WORKERS",
    "DemoBudget",
    "DemoLauncher",
    "demo_strategies",
    "descendants",
]

log = logging.getLogger("distlearn.live")

DEMO_WORKERS: dict[str, int] = {"single": 1, "ps": 3}
"""Processes per strategy in the demo; the others get 2. ``ps``: one server rank and two workers."""


DEFAULT_STRATEGIES: tuple[str, ...] = ("sync", "ps", "hogwild")
"""The demo's runs unless ``--strategies`` says otherwise: one synchronous and two asynchronous strategies
(the overview's sync and async animations, made live). Those not registered are left out."""


def demo_strategies(spec: str | None = None) -> list[str]:
    """The demo's strategies.

    ``None`` or ``"default"``: those of :data:`DEFAULT_STRATEGIES` that are registered; ``"all"``: every
    registered strategy; otherwise a comma-separated list of registered names, validated.
    """
    from distlearn.parallel import STRATEGIES

    known = list(STRATEGIES)
    if spec is None or spec.strip() == "default":
        return [name for name in DEFAULT_STRATEGIES if name in STRATEGIES]
    if spec.strip() == "all":
        return known
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ConfigError(
            f"unknown demo strateg{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(known)} (comma-separated), default or all"
        )
    return list(dict.fromkeys(names))


@dataclass
class DemoBudget:
    """The fixed work every demo run does (``distlearn train`` flags of the same names)."""

    dataset: str = "fashion-mnist"
    model: str = "mlp"
    optimizer: str = "adam"
    steps: int = 300
    batch_size: int = 64
    train_samples: int = 12000
    test_samples: int = 2000
    log_every: int = 5
    eval_every: int = 50
    seed: int = 0
    extra: list[str] = field(default_factory=list)
    """More ``distlearn train`` flags, given to every run."""

    def flags(self) -> list[str]:
        for name in ("steps", "batch_size", "train_samples", "test_samples", "log_every", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"demo {name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        return [
            "--dataset", self.dataset, "--model", self.model, "--optimizer", self.optimizer,
            "--steps", str(self.steps), "--batch-size", str(self.batch_size),
            "--train-samples", str(self.train_samples), "--test-samples", str(self.test_samples),
            "--log-every", str(self.log_every), "--eval-every", str(self.eval_every),
            "--seed", str(self.seed),
            "--threads", "1", "--no-checkpoints", "--progress", "off", "--tensorboard", "off", "--quiet",
            *self.extra,
        ]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...), from psutil's process table."""
    psutil = require_extra("psutil", "live", "distlearn live --demo")
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:  # ended (or never existed): no descendants to find
        return []


def _alive(pid: int) -> bool:
    psutil = require_extra("psutil", "live", "distlearn live --demo")
    try:
        # a zombie has ended; only its parent's wait is missing
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class _Run:
    name: str
    workers: int
    directory: Path
    command: list[str]
    process: subprocess.Popen | None = None
    stopped: bool = False


class DemoLauncher:
    """Starts one ``distlearn train`` per strategy, each in its own process group; stops them all.

    Args:
        out: parent directory; run ``s`` writes ``out/s`` (metrics, and ``train.log`` with its output).
        strategies: strategy names (default: all of :data:`distlearn.parallel.STRATEGIES`).
        budget: the work each run does.
        python: the interpreter that runs ``-m distlearn train`` (default: this one).
    """

    def __init__(
        self,
        out: str | Path,
        strategies: list[str] | None = None,
        budget: DemoBudget | None = None,
        python: str = sys.executable,
    ) -> None:
        self.out = Path(out)
        self.budget = budget or DemoBudget()
        flags = self.budget.flags()
        self._runs = []
        for name in strategies if strategies is not None else demo_strategies():
            workers = DEMO_WORKERS.get(name, 2)
            directory = self.out / name
            command = [python, "-m", "distlearn", "train", *flags, "--strategy", name,
                       "--workers", str(workers), "--out", str(directory), "--name", name]  # fmt: skip
            self._runs.append(_Run(name, workers, directory, command))
        if not self._runs:
            raise ConfigError("the demo needs at least one strategy, e.g. --strategies single,sync")

    def runs(self) -> list[tuple[str, Path]]:
        """``(strategy, run directory)`` of every run, in start order."""
        return [(run.name, run.directory) for run in self._runs]

    def start(self) -> None:
        """Start every run (directories are created first so the page never reports them missing)."""
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        for run in self._runs:
            run.directory.mkdir(parents=True, exist_ok=True)
            with open(run.directory / "train.log", "wb") as output:
                run.process = subprocess.Popen(
                    run.command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    start_new_session=True,  # its own process group: Ctrl-C in our terminal does not reach it
                    preexec_fn=_default_sigint,  # so stop() can interrupt it even if we ignore SIGINT
                )
            log.info("demo: started %s (pid %d): %s", run.name, run.process.pid, " ".join(run.command))

    def status(self) -> list[dict[str, Any]]:
        """Per run: ``label``, ``state`` (waiting, running, finished, failed, stopped), exit code, output."""
        report = []
        for run in self._runs:
            entry: dict[str, Any] = {
                "label": run.name,
                "workers": run.workers,
                "command": " ".join(run.command),
            }
            code = None if run.process is None else run.process.poll()
            if run.process is None:
                entry["state"] = "waiting"
            elif code is None:
                entry["state"] = "running"
            else:
                entry["state"] = "stopped" if run.stopped else ("finished" if code == 0 else "failed")
                entry["returncode"] = code
                if code != 0 and not run.stopped:
                    entry["log_tail"] = self.log_tail(run.name)
            report.append(entry)
        return report

    def log_tail(self, name: str, lines: int = 6) -> str:
        """The last lines a run printed (its ``train.log``)."""
        path = self.out / name / "train.log"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def running(self) -> bool:
        return any(run.process is not None and run.process.poll() is None for run in self._runs)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every run has ended (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self, grace: float = 15.0) -> None:
        """Interrupt every run's process group, then kill whatever of their process trees is left.

        A second Ctrl-C while the runs wind down kills them at once instead of waiting out ``grace``.
        """
        tree: dict[str, list[int]] = {}
        for run in self._runs:
            if run.process is None or run.process.poll() is not None:
                continue
            run.stopped = True
            tree[run.name] = [run.process.pid, *descendants(run.process.pid)]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        try:
            while time.monotonic() < deadline and any(_alive(p) for pids in tree.values() for p in pids):
                for run in self._runs:
                    if run.process is not None:
                        run.process.poll()  # reap, so an ended leader is not counted as a live zombie
                time.sleep(0.1)
        except KeyboardInterrupt:
            log.warning("demo: interrupted again; killing the runs now")
            grace = 0.0
        for name, pids in tree.items():
            left = [p for p in pids if _alive(p)]
            if left:
                log.warning(
                    "demo: %s did not stop within %g s; killing %d process(es)", name, grace, len(left)
                )
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for run in self._runs:
            if run.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.process.wait(timeout=5)


def _default_sigint() -> None:
    """In a run's child before exec: SIGINT back to its default, whatever this process inherited (a job
    started in the background of a shell, or by a parent that ignores SIGINT, passes SIG_IGN on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
