"""What a ``distlearn rl`` run leaves behind: ``OUT/summary.json``, the summary table, and the OUT check.

* :func:`write_summary`: the job's main process writes its summary (and the flat config) as JSON.
* :func:`print_summary`: the summary as a two-column rich table, like ``distlearn train``'s.
* :func:`check_out`: an OUT that holds an earlier run is refused unless ``--resume`` or ``--overwrite``
  (``--overwrite`` removes its metrics, summary and checkpoints first): :func:`distlearn.rundir.prepare_out`,
  as for ``distlearn train``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distlearn.errors import ConfigError
from distlearn.metrics import METRICS_FILE
from distlearn.rundir import prepare_out

__all__ = ["SUMMARY_FILE", "check_out", "is_main", "print_summary", "read_summary", "write_summary"]

SUMMARY_FILE = "summary.json"


def _out(config: Any) -> Path:
    return Path(config.out or f"runs/rl-{config.algorithm}")


def check_out(config: Any) -> None:
    """ConfigError if ``--resume`` names nothing, or OUT holds an earlier run and neither --resume nor
    --overwrite is given (with --overwrite, that run's files are deleted)."""
    out = _out(config)
    if config.resume is not None and not Path(config.resume).exists():
        raise ConfigError(
            f"--resume {config.resume}: no such file or directory; pass a checkpoint written by a run with "
            "--checkpoint-every (OUT/checkpoints/step-*.pt, or that directory for its newest)"
        )
    prepare_out(config, out)


def is_main(summary: dict[str, Any]) -> bool:
    """Whether ``summary`` is the job's (a3c --servers: the first worker's; otherwise rank 0's)."""
    return bool(summary.get("main", summary.get("rank", 0) == 0))


def write_summary(config: Any, summary: dict[str, Any]) -> Path | None:
    """Write the main process's ``summary`` (with the env and the flat config) to ``OUT/summary.json``."""
    if not is_main(summary):
        return None
    from distlearn.rl.config import flat_values

    out = _out(config)
    out.mkdir(parents=True, exist_ok=True)
    values = {**summary, "env": config.env, "out": str(out), "metrics": str(out / METRICS_FILE)}
    values["config"] = {k: v for k, v in flat_values(config).items()}
    path = out / SUMMARY_FILE
    path.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    return path


def read_summary(out: str | Path) -> dict[str, Any] | None:
    """``OUT/summary.json``, or None if the run wrote none."""
    path = Path(out) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _number(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_summary(summary: dict[str, Any]) -> None:
    """The summary as a table on stdout (a two-column rich table, as ``distlearn train`` prints)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"distlearn rl {summary['algorithm']}: summary", show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    solved = summary.get("solved_env_steps")
    workers = summary.get("workers")
    processes = f"{workers} workers" + (f", {summary['servers']} servers" if summary.get("servers") else "")
    resumed = summary.get("resumed_from_update")
    rows = [
        ("environment", summary.get("env", "")),
        ("algorithm", f"{summary['algorithm']}, {processes}"),
        (
            "updates",
            f"{summary['updates']:,}"
            + (
                f", resumed from update {resumed}: {summary['updates'] - resumed:,} in this run"
                if resumed is not None
                else ""
            ),
        ),
        ("env steps", f"{summary['env_steps']:,}"),
        ("final return", f"{_number(summary.get('final_return'))} (mean of the last 100 episodes)"),
        (
            "solved",
            f"after {solved:,} env steps, {summary['solved_seconds']:.1f} s" if solved is not None else "no",
        ),
        ("throughput", f"{_number(summary.get('env_steps_per_s'), 0)} env steps/s"),
        ("time", f"{summary['seconds']:.1f} s" + (" (this run)" if resumed is not None else "")),
        ("dead workers", ", ".join(str(d) for d in summary.get("dead_workers") or [])),
        ("lost bundles", ", ".join(str(d) for d in summary.get("lost_bundles") or [])),
        ("metrics", summary.get("metrics", "")),
        ("checkpoint", summary.get("checkpoint") or ""),
    ]
    for key, value in rows:
        if value:
            table.add_row(key, str(value))
    Console(soft_wrap=True).print(table)
