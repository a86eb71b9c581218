"""Run a suite: every entry as its own ``distlearn train`` job, bounded in time, results read from metrics.

Each entry runs in fresh processes (``python -m distlearn train ... --out RUNS/<slug>``; distributed
strategies start their own torchrun job underneath), with a deadline after which the whole process group
is stopped. Everything in the results is read back from the run's metrics files: no number is typed in.

Besides its numbers, every row says what the report needs to know about its run (:func:`report_fields`):
which reference it is, if any, and how its communication is projected to more workers. The report reads
these fields and never a strategy's name.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distlearn.bench.suites import Entry, Suite
from distlearn.launch import wait_or_stop
from distlearn.metrics import read_metrics

__all__ = [
    "REFERENCES",
    "available",
    "collect",
    "finished_entry",
    "report_fields",
    "run_entry",
    "run_suite",
    "slug",
    "train_arguments",
]

REFERENCES = ("one-process", "framework")
"""The values of a row's ``reference``: the one-process run (the table's "vs single" divides by its samples/s,
the projection takes its compute time per example) and the framework's own data parallelism, torch DDP
("vs DDP")."""


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def available(entry: Entry) -> str | None:
    """None when ``entry`` can run here, else the reason it cannot."""
    from distlearn.parallel import STRATEGIES, strategy_class
    from distlearn.parallel.base import option_names
    from distlearn.train.config import COMMON

    if entry.strategy not in STRATEGIES:
        return f"strategy {entry.strategy!r} is not in this installation"
    fields = set(COMMON) | set(option_names(strategy_class(entry.strategy).Options))
    for requirement in entry.requires:
        kind, _, name = requirement.partition(":")
        if kind == "reducer":
            from distlearn.comm.reducers import REDUCERS

            if name not in REDUCERS:
                return f"reducer {name!r} is not available"
        elif kind == "compression":
            try:
                from distlearn.comm.compression import COMPRESSORS
            except ImportError:
                return "distlearn.comm.compression is not installed"
            if name not in COMPRESSORS:
                return f"codec {name!r} is not available"
        elif kind == "strategy" and name not in STRATEGIES:
            return f"strategy {name!r} is not in this installation"
    for flag in entry.flags:
        if flag.startswith("--") and flag[2:].replace("-", "_").removeprefix("no_") not in fields:
            return f"distlearn train has no {flag} flag yet"
    return None


def train_arguments(suite: Suite, entry: Entry, out: Path) -> list[str]:
    """The ``distlearn train`` arguments of one entry: the suite's shared work, then the entry's flags."""
    arguments = [
        *suite.train_flags(),
        "--out",
        str(out),
        "--strategy",
        entry.strategy,
        "--no-checkpoints",
        "--progress",
        "off",
        "--tensorboard",
        "off",
        "--quiet",
        "--overwrite",  # a rerun of the suite replaces the entry's earlier run
        *entry.flags,
    ]
    if entry.workers > 1 or entry.strategy != "single":
        arguments += ["--workers", str(entry.workers)]
    return arguments


def run_entry(suite: Suite, entry: Entry, runs_dir: Path, *, log: Any = None) -> dict[str, Any]:
    """Run one entry and return its raw result (see :func:`collect`); failures are results too."""
    out = runs_dir / slug(entry.label)
    reason = available(entry)
    base = _identity(entry)
    if reason is not None:
        return {**base, "status": "not available", "reason": reason}
    command = [sys.executable, "-m", "distlearn", "train", *train_arguments(suite, entry, out)]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    # the run is in a session of its own (its workers in another, under it); stopping the bench stops it too
    try:
        code = wait_or_stop(process, suite.timeout_s)
    except subprocess.TimeoutExpired:
        return {
            **base,
            "status": "timed out",
            "reason": f"no result within {suite.timeout_s:g} s",
            "out": str(out),
        }
    elapsed = time.perf_counter() - started
    if code != 0:
        return {
            **base,
            "status": "failed",
            "reason": f"exit status {code}",
            "out": str(out),
            "seconds": elapsed,
        }
    return {**base, "status": "ok", "out": str(out), "process_seconds": elapsed, **collect(out, suite.target)}


def collect(run_dir: str | Path, target: float) -> dict[str, Any]:
    """The numbers of one finished run, from its metrics files (rank 0's and every other rank's)."""
    run_dir = Path(run_dir)
    # The evaluating process writes the summary: rank 0, or the first worker when rank 0 is a server.
    main, summary = [], None
    for path in sorted(run_dir.glob("metrics*.jsonl")):
        records = read_metrics(path)
        summary = next((r for r in reversed(records) if r.kind == "summary" and r.accuracy is not None), None)
        if summary is not None:
            main = records
            break
    if summary is None:
        raise ValueError(f"{run_dir}: no process wrote a summary record; did the run finish?")
    evals = [r for r in main if r.kind == "eval" and r.accuracy is not None]
    hit = next((r for r in evals if r.accuracy >= target), None)
    bytes_sent, staleness, delays = 0, [], {}
    for path in sorted(run_dir.glob("metrics*.jsonl")):
        records = read_metrics(path)
        last = next((r for r in reversed(records) if r.bytes_sent is not None), None)
        bytes_sent += last.bytes_sent if last is not None else 0
        staleness += [r.staleness for r in records if r.staleness is not None]
        done = next((r for r in reversed(records) if r.kind == "summary"), None)
        if done is not None and "straggler_delay_s" in done.extra:  # --straggler, --straggler-dist
            delays[str(done.rank)] = done.extra["straggler_delay_s"]
    extra = summary.extra
    return {
        "final_accuracy": summary.accuracy,
        "best_accuracy": extra.get("best_accuracy"),
        "time_to_target_s": hit.wall_time if hit else None,
        "train_seconds": extra.get("train_seconds"),
        "wall_seconds": summary.wall_time,
        "samples_per_s": extra.get("job_samples_per_s", summary.samples_per_s),
        "updates": summary.step,
        "bytes_sent": bytes_sent,
        "mean_staleness": sum(staleness) / len(staleness) if staleness else None,
        "train_examples": extra.get("train_examples"),
        "parameters": extra.get("parameters"),
        "strategy_description": extra.get("strategy"),
        "dataset_note": extra.get("dataset_note"),
        "curve": [
            {"wall_time": r.wall_time, "step": r.step, "accuracy": r.accuracy}
            | ({"sim_time_s": r.extra["sim_time_s"]} if "sim_time_s" in r.extra else {})
            for r in evals
        ],
        **({"straggler_delay_s": delays, "sim_time_s": extra.get("sim_time_s")} if delays else {}),
    }


def finished_entry(suite: Suite, entry: Entry, runs_dir: Path) -> dict[str, Any] | None:
    """The result of ``entry``'s run in ``runs_dir`` if that run finished (wrote its summary), else None."""
    out = runs_dir / slug(entry.label)
    try:
        numbers = collect(out, suite.target)
    except (ValueError, OSError):  # no run, or one that was stopped before its summary
        return None
    return {**_identity(entry), "status": "ok", "out": str(out), "resumed": True, **numbers}


def _identity(entry: Entry) -> dict[str, Any]:
    """The fields that name a row in the results, whatever became of its run, and its report fields."""
    flags = list(entry.flags)
    return {
        "label": entry.label,
        "strategy": entry.strategy,
        "workers": entry.workers,
        "flags": flags,
        **report_fields(entry.strategy, flags),
    }


def _flag(flags: Sequence[str], name: str, default: str | None = None) -> str | None:
    """The value after ``name`` in ``flags`` (the last ``distlearn train`` arguments of an entry)."""
    flags = list(flags)
    return flags[flags.index(name) + 1] if name in flags and flags.index(name) + 1 < len(flags) else default


def report_fields(strategy: str, flags: Sequence[str]) -> dict[str, Any]:
    """What the report needs to know about a run of ``strategy`` with ``flags`` beyond its measured numbers.

    * ``reference``: one of :data:`REFERENCES`, or None.
    * ``projection``: how the run's communication grows with the number of workers ``R`` (the formulas are
      in :mod:`distlearn.bench.report`), or None where ``R`` is not a number of data replicas over a network
      (the single process; Hogwild!, which shares memory on one machine; DNI, whose processes are model
      stages). Else a dict with ``model``:

      - ``"allreduce"``: ``algorithm`` (the ``--reducer`` or DDP's ``--comm-hook``, ``"backend"`` for the
        backend's own, which DDP uses without a hook) once every ``every`` updates (local SGD's
        ``--average-every``, EASGD's ``--elastic-tau``);
      - ``"all-gather"``: a codec whose payloads do not add up (sign bits, sparse indices ...): a ring
        all-gather of every rank's payload;
      - ``"parameter-server"``: ``servers``, ``backup_workers`` and ``local_steps``; each worker pulls and
        pushes the whole model.

    Rows written before these fields existed get them from this function when the report reads them.
    """
    reference = {"single": "one-process", "ddp": "framework"}.get(strategy)
    projection: dict[str, Any] | None
    if strategy in ("single", "hogwild", "dni"):
        projection = None
    elif strategy == "ps":
        projection = {
            "model": "parameter-server",
            "servers": int(_flag(flags, "--servers", "1")),
            "backup_workers": int(_flag(flags, "--backup-workers", "0")),
            "local_steps": int(_flag(flags, "--local-steps", "1")),
        }
    elif (codec := _flag(flags, "--compression")) is not None and not _allreducible(codec):
        projection = {"model": "all-gather"}
    else:
        every = int(_flag(flags, "--average-every") or _flag(flags, "--elastic-tau") or 1)
        algorithm = _flag(flags, "--reducer") or _flag(flags, "--comm-hook") or "backend"
        if algorithm == "none":  # --comm-hook none: DDP's own allreduce
            algorithm = "backend"
        projection = {"model": "allreduce", "algorithm": algorithm, "every": every}
    return {"reference": reference, "projection": projection}


def _allreducible(codec: str) -> bool:
    """False for a codec whose payloads do not add up (it all-gathers); True for the others and for a codec
    this installation does not have (its entry is "not available" and never projected)."""
    from distlearn.comm.compression import COMPRESSORS, create_compressor

    return codec not in COMPRESSORS or create_compressor(codec).summable


def run_suite(
    suite: Suite,
    runs_dir: Path,
    *,
    progress: bool = True,
    only: list[str] | None = None,
    resume: bool = False,
) -> list[dict]:
    """Run every entry of ``suite`` (or those whose label contains one of ``only``), one after another.

    With ``resume`` the entries whose run in ``runs_dir`` finished (a stopped invocation's) are read back
    (marked ``"resumed": True``) and only the others run.
    """
    entries = [e for e in suite.entries if not only or any(o.lower() in e.label.lower() for o in only)]
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = []

    def result(entry: Entry) -> dict[str, Any]:
        done = finished_entry(suite, entry, runs_dir) if resume else None
        return done or run_entry(suite, entry, runs_dir, log=log)

    with open(runs_dir / "bench.log", "a" if resume else "w") as log:
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
            )
            with Progress(*columns) as bar:
                task = bar.add_task(f"bench {suite.name}", total=len(entries))
                for entry in entries:
                    bar.update(task, description=f"bench {suite.name}: {entry.label}")
                    results.append(result(entry))
                    bar.advance(task)
        else:
            results = [result(entry) for entry in entries]
    return results
