"""Scaling of synchronous SGD with a fixed global batch: time per epoch and time to a target accuracy.

The overview's rule: scale with a fixed global batch B = R x M, so that every R follows the same trajectory
and only the time changes. Runs ``distlearn train --strategy sync --workers R`` for each R (R = 1 is the
single-process strategy), all with the same seed, model, data and B, evaluating every ``--eval-every``
steps, and reads everything from the runs' metrics files. On this 2-core machine R = 2 gives each process
one core; R = 4 oversubscribes the cores (labelled as such): it measures contention, not scaling.

    python benchmarks/sync_scaling.py [--workers 1,2,4] [--epochs 3] [--target 0.88]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distlearn.metrics import read_metrics  # noqa: E402


def run(workers: int, args, out: Path) -> dict:
    command = [
        sys.executable, "-m", "distlearn", "train", "--dataset", args.dataset, "--model", args.model,
        "--optimizer", "torch-adam", "--lr", "2e-3", "--epochs", str(args.epochs),
        "--batch-size", str(args.batch),
        "--eval-every", str(args.eval_every), "--no-checkpoints", "--progress", "off", "--tensorboard", "off",
        "--quiet", "--out", str(out), "--seed", "0",
    ]  # fmt: skip
    if workers > 1:
        command += ["--strategy", "sync", "--workers", str(workers)]
    else:
        command += ["--threads", str(args.single_threads or os.cpu_count() or 1)]
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=3600)
    wall = time.perf_counter() - started
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if r.kind == "eval"]
    summary = next(r for r in records if r.kind == "summary")
    hit = next((r for r in evals if r.accuracy is not None and r.accuracy >= args.target), None)
    per_epoch = summary.extra["seconds_per_epoch"]
    return {
        "workers": workers,
        "oversubscribed": workers > (os.cpu_count() or 1),
        "seconds_per_epoch": per_epoch,
        "median_epoch_s": sorted(per_epoch)[len(per_epoch) // 2] if per_epoch else None,
        "time_to_target_s": hit.wall_time if hit else None,
        "final_accuracy": summary.extra["test_accuracy"],
        "process_wall_s": wall,
        "curve": [(r.wall_time, r.accuracy) for r in evals],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument(
        "--single-threads", type=int, default=None, help="torch threads of the R = 1 run (default: all cores)"
    )
    parser.add_argument("--runs", default="runs/sync-scaling")
    parser.add_argument("--out", default="benchmarks/results/sync_scaling.json")
    parser.add_argument("--plot", default="docs/img/sync-scaling.png")
    args = parser.parse_args(argv)
    results = [run(int(w), args, Path(args.runs) / f"R{w}") for w in args.workers.split(",")]
    base = results[0]
    setting = f"global batch {args.batch}, {args.epochs} epochs, target {args.target}"
    print(f"\n{args.model} on {args.dataset}, {setting}")
    print(f"{'R':>3} {'s/epoch':>8} {'speed-up':>9} {'to target s':>12} {'final acc':>10}  note")
    for row in results:
        speedup = base["median_epoch_s"] / row["median_epoch_s"]
        target = f"{row['time_to_target_s']:.1f}" if row["time_to_target_s"] is not None else "not reached"
        note = "oversubscribed: more processes than cores" if row["oversubscribed"] else ""
        print(f"{row['workers']:>3} {row['median_epoch_s']:>8.1f} {speedup:>8.2f}x {target:>12} "
              f"{row['final_accuracy']:>10.4f}  {note}")  # fmt: skip
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in results:
        label = f"R = {row['workers']}" + (" (oversubscribed)" if row["oversubscribed"] else "")
        axis.plot(*zip(*row["curve"], strict=True), marker=".", label=label)
    axis.axhline(args.target, color="grey", linestyle=":", linewidth=1)
    axis.set(
        xlabel="wall time (s)", ylabel="test accuracy", title=f"sync SGD, fixed global batch {args.batch}"
    )
    axis.legend()
    figure.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=110)
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
