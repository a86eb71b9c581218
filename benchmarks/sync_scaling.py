"""Scaling of synchronous SGD with a fixed global batch: time per epoch and time to a target accuracy.

The overview's rule: scale with a fixed global batch B = R x M, so that every R follows the same trajectory
and only the time changes. Runs ``distlearn train --strategy sync --workers R`` for each R (R = 1 is the
single-process strategy), all with the same seed, model, data and B, evaluating every ``--eval-every``
steps, and reads everything from the runs' metrics files. On this 2-core machine R = 2 gives each process
one core; R = 4 oversubscribes the cores (labelled as such): it measures contention, not scaling.

    python benchmarks/sync_scaling.py [--workers 1,2,4] [--epochs 3] [--target 0.88]

``--configs 1x1,1x2,2x1,4x1`` names each run as processes x torch threads (R = 1 may use several threads;
R > 1 uses one thread per process), replacing ``--workers`` and ``--single-threads``. ``--seeds 0 1 2`` runs
every configuration once per seed (``--seed S``), the order of the configurations rotated from one seed to
the next so that a drift of the machine's speed falls on every configuration alike; the JSON then keeps
every run with its seed, each configuration's mean and sample standard deviation over the seeds (seconds
per epoch, speed-up against the first configuration *of the same seed*, time to target, final accuracy), and
``--table FILE.md`` writes them as the Markdown table docs/sync.md copies. Without ``--seeds`` every run
carries ``--seed 0``, as before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distlearn.metrics import read_metrics  # noqa: E402


def run(workers: int, args, out: Path, threads: int | None = None, seed: int = 0) -> dict:
    command = [
        sys.executable, "-m", "distlearn", "train", "--dataset", args.dataset, "--model", args.model,
        "--optimizer", "torch-adam", "--lr", "2e-3", "--epochs", str(args.epochs),
        "--batch-size", str(args.batch),
        "--eval-every", str(args.eval_every), "--no-checkpoints", "--progress", "off", "--tensorboard", "off",
        "--quiet", "--out", str(out), "--seed", str(seed),
    ]  # fmt: skip
    if args.train_samples:
        command += ["--train-samples", str(args.train_samples)]
    if args.test_samples:
        command += ["--test-samples", str(args.test_samples)]
    if workers > 1:
        command += ["--strategy", "sync", "--workers", str(workers)]
    else:
        threads = threads or args.single_threads or os.cpu_count() or 1
        command += ["--threads", str(threads)]
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
        "threads": threads if workers == 1 else 1,
        "seed": seed,
        "oversubscribed": workers > (os.cpu_count() or 1),
        "seconds_per_epoch": per_epoch,
        "median_epoch_s": sorted(per_epoch)[len(per_epoch) // 2] if per_epoch else None,
        "time_to_target_s": hit.wall_time if hit else None,
        "final_accuracy": summary.extra["test_accuracy"],
        "process_wall_s": wall,
        "curve": [(r.wall_time, r.accuracy) for r in evals],
    }


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"1x1,1x2,2x1"`` -> [(1, 1), (1, 2), (2, 1)]: processes x torch threads; R > 1 takes one thread."""
    configs = []
    for item in text.split(","):
        processes, _, threads = item.strip().partition("x")
        if not (processes.isdigit() and threads.isdigit()) or int(processes) < 1 or int(threads) < 1:
            raise SystemExit(f"--configs: {item!r} is not PROCESSESxTHREADS (e.g. 1x2 or 4x1)")
        if int(processes) > 1 and int(threads) != 1:
            raise SystemExit(
                f"--configs: {item!r}: runs with R > 1 use one thread per process; write {processes}x1"
            )
        configs.append((int(processes), int(threads)))
    return configs


def mean_std(values: list[float]) -> list[float]:
    """[mean, sample std] (std 0 for a single value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def run_seeds(configs: list[tuple[int, int]], args) -> list[dict]:
    """Every configuration once per seed, the order rotated per seed; each configuration's runs and summary.
    The speed-up of a run is against the first configuration's run of the same seed."""
    done: dict[tuple[int, int], list[dict]] = {config: [] for config in configs}
    for index, seed in enumerate(args.seeds):
        order = configs[index % len(configs) :] + configs[: index % len(configs)]
        for processes, threads in order:
            place = Path(args.runs) / f"seed{seed}" / f"R{processes}x{threads}"
            row = run(processes, args, place, threads, seed)
            print(f"seed {seed} {processes}x{threads}: {row['median_epoch_s']:.1f} s/epoch, "
                  f"final {row['final_accuracy']:.4f}", flush=True)  # fmt: skip
            done[(processes, threads)].append(row)
    base = {r["seed"]: r["median_epoch_s"] for r in done[configs[0]]}
    summaries = []
    for config in configs:
        runs = sorted(done[config], key=lambda r: args.seeds.index(r["seed"]))
        hits = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        summaries.append({
            "workers": config[0],
            "threads": config[1],
            "oversubscribed": config[0] > (os.cpu_count() or 1),
            "seeds": [r["seed"] for r in runs],
            "median_epoch_s": mean_std([r["median_epoch_s"] for r in runs]),
            "speedup": mean_std([base[r["seed"]] / r["median_epoch_s"] for r in runs]),
            "time_to_target_s": mean_std(hits) if hits else None,
            "reached": len(hits),
            "final_accuracy": mean_std([r["final_accuracy"] for r in runs]),
            "runs": runs,
        })  # fmt: skip
    return summaries


def seeds_table(summaries: list[dict], target: float) -> str:
    """The Markdown table of a ``--seeds`` run: mean ± std over the seeds, accuracy in %."""
    n = len(summaries[0]["seeds"])
    first = summaries[0]
    lines = [
        f"| R | processes x threads | s / epoch (n = {n}) "
        f"| speed-up vs {first['workers']} x {first['threads']} (same seed) | time to {target:.0%} (s) "
        f"| final accuracy (%, n = {n}) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summaries:
        label = f"{s['workers']} x {s['threads']}" + (" (oversubscribed)" if s["oversubscribed"] else "")
        if s["time_to_target_s"] is None:
            reach = f"not reached (0 of {n})"
        else:
            reach = "{:.1f} ± {:.1f}".format(*s["time_to_target_s"])
            if s["reached"] < n:
                reach += f" ({s['reached']} of {n} reached)"
        lines.append(
            f"| {s['workers']} | {label} | {s['median_epoch_s'][0]:.1f} ± {s['median_epoch_s'][1]:.1f} "
            f"| {s['speedup'][0]:.2f} ± {s['speedup'][1]:.2f}x | {reach} "
            f"| {100 * s['final_accuracy'][0]:.2f} ± {100 * s['final_accuracy'][1]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main_seeds(args) -> int:
    single = args.single_threads or os.cpu_count() or 1
    configs = parse_configs(args.configs) if args.configs else [
        (int(w), single if int(w) == 1 else 1) for w in args.workers.split(",")
    ]  # fmt: skip
    load_start = os.getloadavg()
    summaries = run_seeds(configs, args)
    table = seeds_table(summaries, args.target)
    print(table)
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "load_at_start": load_start,
                    "load_at_end": os.getloadavg()},
        "settings": {"dataset": args.dataset, "model": args.model, "epochs": args.epochs, "batch": args.batch,
                     "eval_every": args.eval_every, "target": args.target, "seeds": args.seeds},
        "results": summaries,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.table:
        Path(args.table).write_text(table)
    figure, axis = plt.subplots(figsize=(6, 4))
    for s in summaries:
        run0 = s["runs"][0]
        label = f"{s['workers']} x {s['threads']}, seed {run0['seed']}"
        axis.plot(*zip(*run0["curve"], strict=True), marker=".", label=label)
    axis.axhline(args.target, color="grey", linestyle=":", linewidth=1)
    title = f"sync SGD, fixed global batch {args.batch} ({len(args.seeds)} seeds; the first drawn)"
    axis.set(xlabel="wall time (s)", ylabel="test accuracy", title=title)
    axis.legend()
    figure.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=110)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--train-samples", type=int, default=None, help="default: the whole training set")
    parser.add_argument("--test-samples", type=int, default=None, help="default: the whole test set")
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument(
        "--single-threads", type=int, default=None, help="torch threads of the R = 1 run (default: all cores)"
    )
    parser.add_argument("--configs", default=None, help="PROCESSESxTHREADS,... e.g. 1x1,1x2,2x1,4x1")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="a run per config and seed")
    parser.add_argument("--table", default=None, help="with --seeds: write the Markdown table here")
    parser.add_argument("--runs", default="runs/sync-scaling")
    parser.add_argument("--out", default="benchmarks/results/sync_scaling.json")
    parser.add_argument("--plot", default="docs/img/sync-scaling.png")
    args = parser.parse_args(argv)
    if args.seeds:
        return main_seeds(args)
    if args.configs or args.table:
        parser.error("--configs and --table need --seeds")
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
