"""Results of a suite: the raw JSON, the Markdown table, the plots, the projection, and comparisons.

Every number in the table is computed here from the raw results (:func:`table_rows`), which are read from
the runs' metrics files; ``tests/bench`` checks that the table agrees with the JSON.

Projection (labelled as such): seconds per epoch of ``N`` examples at ``R`` workers on a 10 or 100 Gb/s
network, from the single process's measured compute time per example ``t_c`` and each run's measured bytes,
with the alpha-beta costs of :mod:`distlearn.comm.cost_model` (alpha = 20 us per message, beta = 8 / link
bits per second). ``M = B / R`` examples per worker and update; ``R > B`` is not projected (less than one
example per worker at the fixed global batch).

* sync and DDP, dense or with a codec whose payloads add up (casts, random-k, PowerSGD: allreduced):
  ``T = N/B * (M t_c + allreduce_A(R, n))`` with ``A`` the row's reducer (``--reducer``; gloo's ring for DDP
  and the backend) and ``n`` the bytes one rank reduces per update, from the measured bytes per update of
  all ranks, ``2 (R0 - 1) n`` at the measured ``R0`` (every algorithm of the model sends that many in all);
  the shared-memory reducers (``--reducer shm``, ``hierarchical``, ``auto`` on the CPU of one host; DDP's
  ``--comm-hook`` with them; the measured run's ``R0`` ranks share one host) project as the hierarchical
  allreduce on hosts of ``L = gcd(R0, R)`` ranks: shm within each host on the memory model
  (:func:`distlearn.comm.cost_model.memory`, one core's copy rate) and a ring of ``n / L`` bytes across the
  ``R / L`` hosts on the network;
* sync with a codec that all-gathers (sign bits, ternary, quantised, sparse index + value payloads): ring
  all-gather of each rank's ``b`` bytes, ``T = N/B * (M t_c + (R - 1) (alpha + b beta))``, measured
  ``R0 (R0 - 1) b``: what a rank receives grows with ``R``;
* local SGD (``--average-every k``) and EASGD (``--elastic-tau k``): one allreduce of the parameters every
  ``k`` updates, ``T = N/B * (M t_c + allreduce_backend(R, n) / k)``;
* parameter server (``S`` servers, ``b`` backup workers, ``k`` local steps): every worker pulls and pushes
  the ``n = 4 x parameters`` bytes of the fp32 model once per ``k`` steps, and the servers' links carry every
  push of all ``R + b`` workers (each push in, its pull out: full duplex):
  ``T = max(N/(B k) * (k M t_c + 2 (alpha + n beta)), N (R + b) / (B k S) * (alpha + n beta))``; the
  second term, linear in ``R``, is the server bottleneck.

Perfect compute scaling, no overlap of communication with computation, no contention, no stragglers: a
bound to compare strategies by, not a prediction. Not projected: the single process, Hogwild! (shared
memory on one machine) and DNI (its processes are model stages, not data replicas).

Which formula applies to a row, and which rows are the references of the ratio columns, the row itself says
(its ``projection`` and ``reference``, written by :func:`distlearn.bench.harness.report_fields`): the
report never reads a strategy's name.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from distlearn.bench.harness import report_fields
from distlearn.errors import DataError, require_extra
from distlearn.tables import markdown_table

__all__ = ["PROJECTION_WORKERS", "compare", "environment", "markdown", "plot", "project", "table_rows"]

PROJECTION_WORKERS = (8, 32, 128, 256)
NETWORKS = {"10 Gb/s": 10.0, "100 Gb/s": 100.0}
ALPHA_S = 20e-6


def environment() -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    from distlearn import __version__

    return {
        "command": " ".join(["distlearn", *sys.argv[1:]]) if sys.argv else "distlearn bench",
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "distlearn": __version__,
        "git_commit": commit,
    }


def _with_report_fields(result: dict) -> dict:
    """``result`` with its ``reference`` and ``projection``; rows written before the harness recorded them
    (the result files of earlier versions) get them as the harness would write them now."""
    if "reference" in result and "projection" in result:
        return result
    return {**report_fields(result.get("strategy", ""), result.get("flags") or ()), **result}


def _reference(results: list[dict], reference: str) -> dict | None:
    """The first finished row that is ``reference`` (one of :data:`distlearn.bench.harness.REFERENCES`)."""
    rows = (_with_report_fields(r) for r in results)
    return next((r for r in rows if r["reference"] == reference and r.get("status") == "ok"), None)


def project(result: dict, single: dict, workers: int, gbps: float, global_batch: int) -> float | None:
    """Projected seconds per epoch of ``result``'s strategy at ``workers`` workers (see the module doc)."""
    from distlearn.comm.cost_model import link
    from distlearn.comm.cost_model import project as allreduce_time

    if result.get("status") != "ok" or not single or not result.get("updates") or not single.get("updates"):
        return None
    # None: R is not a number of data replicas over a network (see distlearn.bench.harness.report_fields)
    projection = _with_report_fields(result)["projection"]
    if projection is None or workers > global_batch:
        return None
    compute_per_example = single["train_seconds"] / (single["updates"] * global_batch)
    examples = single["train_examples"]
    compute = global_batch / workers * compute_per_example  # M t_c, one update of one worker
    network = link(gbps, alpha=ALPHA_S)
    if projection["model"] == "parameter-server":
        if not result.get("parameters"):
            return None
        servers, backups = projection["servers"], projection["backup_workers"]
        local_steps = projection["local_steps"]
        message = network.alpha + 4 * result["parameters"] * network.beta
        worker = examples / (global_batch * local_steps) * (local_steps * compute + 2 * message)
        server = examples * (workers + backups) / (global_batch * local_steps * servers) * message
        return max(worker, server)
    measured = max(2, result["workers"])
    per_update = result["bytes_sent"] / result["updates"]  # all ranks together
    updates_per_epoch = examples / global_batch
    if projection["model"] == "all-gather":  # ring all-gather of each rank's payload
        payload = per_update / (measured * (measured - 1))
        exchange = (workers - 1) * (network.alpha + payload * network.beta)
    elif projection["model"] == "allreduce":
        every = projection["every"]
        payload = per_update * every / (2 * (measured - 1))
        algorithm = projection["algorithm"]
        if algorithm in ("shm", "hierarchical", "auto"):  # shared memory on hosts of the measured run's size
            local = math.gcd(measured, workers)
            seconds = allreduce_time("hierarchical", workers, payload, network, local_size=local)
        else:
            seconds = allreduce_time(algorithm, workers, payload, network)
        exchange = seconds / every
    else:
        raise DataError(
            f"{result.get('label')}: unknown projection model {projection['model']!r}; "
            "render this result file with the distlearn version that wrote it"
        )
    return updates_per_epoch * (compute + exchange)


def table_rows(results: list[dict], global_batch: int) -> list[dict[str, Any]]:
    """One dict per entry with every column of the table, computed from the raw results only."""
    single, ddp = _reference(results, "one-process"), _reference(results, "framework")
    rows = []
    for r in results:
        row: dict[str, Any] = {"label": r["label"], "status": r["status"]}
        if r["status"] == "ok":
            row.update(
                final_accuracy=r["final_accuracy"],
                time_to_target_s=r["time_to_target_s"],
                samples_per_s=r["samples_per_s"],
                updates=r["updates"],
                bytes_sent=r["bytes_sent"],
                mean_staleness=r["mean_staleness"],
                vs_single=r["samples_per_s"] / single["samples_per_s"] if single else None,
                vs_ddp=r["samples_per_s"] / ddp["samples_per_s"] if ddp else None,
            )
            for name, gbps in NETWORKS.items():
                for workers in PROJECTION_WORKERS:
                    key = f"projected_epoch_s[R={workers}, {name}]"
                    row[key] = project(r, single, workers, gbps, global_batch)
        else:
            row["reason"] = r.get("reason")
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(suite: Any, results: list[dict], env: dict[str, Any]) -> str:
    """The Markdown table (and a projection table) for ``results``."""
    rows = table_rows(results, suite.global_batch)
    lines = [
        f"**{suite.name}**: {suite.description}. Global batch {suite.global_batch}, target accuracy "
        f"{suite.target:.0%}. {env['cores']} cores, torch {env['torch']}, "
        f"commit {str(env['git_commit'])[:10]}.",
        "",
    ]
    header = ["strategy", "final acc.", "time to target (s)", "samples/s", "vs single", "vs DDP", "updates",
              "MB sent", "staleness"]  # fmt: skip
    cells: list[list[str]] = []
    for row in rows:
        if row["status"] != "ok":
            cells.append([row["label"], f"{row['status']}: {row.get('reason', '')}"])
            continue
        cells.append(
            [
                row["label"],
                f"{_fmt(row['final_accuracy'] and 100 * row['final_accuracy'], '.2f')}%",
                _fmt(row["time_to_target_s"], ".1f"),
                _fmt(row["samples_per_s"], ",.0f"),
                f"{_fmt(row['vs_single'], '.2f')}x",
                f"{_fmt(row['vs_ddp'], '.2f')}x",
                str(row["updates"]),
                f"{row['bytes_sent'] / 1e6:.1f}",
                _fmt(row["mean_staleness"], ".2f"),
            ]
        )
    lines.append(markdown_table(header, cells, align="l" + "r" * 8))
    resumed = sum(1 for r in results if r.get("resumed"))
    if resumed:
        lines += [
            "",
            f"{resumed} of {len(results)} rows were read back from runs that earlier invocations left in the "
            "same runs directory (`--resume`); the others ran in this one.",
        ]
    projection_keys = [k for k in (rows[0] if rows else {}) if k.startswith("projected")]
    ok_rows = [r for r in rows if r["status"] == "ok"]
    if ok_rows:
        keys = [k for k in ok_rows[0] if k.startswith("projected")] or projection_keys
        lines += [
            "",
            "Projection (not a measurement; see distlearn.bench.report): seconds per epoch at R workers, "
            f"from the single process's compute time per example and each run's bytes; '-' where R exceeds "
            f"the global batch of {suite.global_batch} (less than one example per worker).",
            "",
        ]
        header = ["strategy", *(k.removeprefix("projected_epoch_s") for k in keys)]
        cells = [[row["label"], *(_fmt(row[k], ".3g") for k in keys)] for row in ok_rows]
        lines.append(markdown_table(header, cells, align="l" + "r" * len(keys)))
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    """Accuracy against wall time, against updates and against bytes sent, one line per strategy.

    Each strategy gets its own colour and dash pattern (ten colours times four dash patterns, so a suite's
    thirty-odd lines stay apart), and the legend sits under the three panels, as tall as it needs to be.
    Bytes sent are on a log axis (codecs send 10-500x less than dense sync); runs that send nothing
    (single process, Hogwild!) are left out of that panel only.
    """
    matplotlib = require_extra("matplotlib", "plot", "distlearn bench's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.get("status") == "ok" and r["curve"]]
    colours = plt.get_cmap("tab10").colors
    dashes = ("-", "--", ":", "-.")
    legend_rows = math.ceil(len(rows) / 3)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2 + 0.16 * legend_rows), squeeze=True)
    for i, r in enumerate(rows):
        style = {"color": colours[i % len(colours)], "linestyle": dashes[(i // len(colours)) % len(dashes)]}
        curve = r["curve"]
        accuracy = [p["accuracy"] for p in curve]
        axes[0].plot([p["wall_time"] for p in curve], accuracy, label=r["label"], **style)
        axes[1].plot([p["step"] for p in curve], accuracy, **style)
        per_step = (r["bytes_sent"] or 0) / max(1, r["updates"])
        if per_step > 0:
            axes[2].plot([p["step"] * per_step / 1e6 for p in curve], accuracy, **style)
    for axis, xlabel in zip(
        axes, ("wall time (s)", "updates", "MB sent, all ranks (log; none-senders left out)"), strict=True
    ):
        axis.set(xlabel=xlabel, ylabel="test accuracy")
        axis.grid(alpha=0.3)
    if axes[2].lines:
        axes[2].set_xscale("log")
    axes[0].set_title(title)
    figure.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.16 * legend_rows / (4.2 + 0.16 * legend_rows), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compare(first: Path, second: Path) -> str:
    """Two result files side by side: final accuracy and samples/s per strategy, and their ratio."""
    a, b = (json.loads(Path(p).read_text()) for p in (first, second))
    rows_a = {r["label"]: r for r in table_rows(a["results"], a["global_batch"])}
    rows_b = {r["label"]: r for r in table_rows(b["results"], b["global_batch"])}
    lines = [
        f"A: {first} ({a['suite']}, commit {str(a['environment']['git_commit'])[:10]})",
        f"B: {second} ({b['suite']}, commit {str(b['environment']['git_commit'])[:10]})",
        "",
    ]
    cells = []
    for label in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        ra, rb = rows_a.get(label, {}), rows_b.get(label, {})
        sa, sb = ra.get("samples_per_s"), rb.get("samples_per_s")
        ratio = sb / sa if sa and sb else None
        acc_a = ra.get("final_accuracy")
        acc_b = rb.get("final_accuracy")
        cells.append(
            [
                label,
                _fmt(acc_a and 100 * acc_a, ".2f"),
                _fmt(acc_b and 100 * acc_b, ".2f"),
                _fmt(sa, ",.0f"),
                _fmt(sb, ",.0f"),
                _fmt(ratio, ".2f"),
            ]
        )
    header = ["strategy", "acc. A", "acc. B", "samples/s A", "samples/s B", "B/A"]
    lines.append(markdown_table(header, cells, align="lrrrrr"))
    return "\n".join(lines) + "\n"
