"""Hogwild!, local SGD and EASGD on Fashion-MNIST: throughput, time to accuracy, accuracy vs wall time.

Claims (issue 8), measured in one run on this machine with the ``distlearn train`` commands printed below:

1. Hogwild with 2 processes (1 thread each) against 1 process with 1 thread and 1 process with 2 threads:
   samples/s and time to a target test accuracy. Every configuration takes updates of the same size
   (``M = 64`` examples: ``--batch-size 64`` for one process, ``128`` = 2 x 64 for Hogwild) with the same
   optimizer, so the comparison is per-update work. Goals: >= 1.8x the single-threaded samples/s, and faster
   than the two-thread process. ``--trials N`` (default 3) runs the four configurations N times in a rotated
   order and reports the median of each trial's ratio: on a shared machine one sequential trial each lets
   the load drift between the runs decide the ratio (a 2.29x from one such run: docs/async.md).
2. Accuracy vs wall time for sync, local SGD (k = 4, 16) and synchronous EASGD (tau = 4), 2 workers, global
   batch 128.

    python benchmarks/async_bench.py --model mlp --epochs 2 --train-samples 12000 --target 0.8

``--seeds 0 1 2`` runs every configuration once per seed (``distlearn train --seed S``; the seeds take the
place of ``--trials``, in a rotated order) and keeps every run with its seed; each configuration's
``summary`` holds the mean and the sample standard deviation over the seeds, and ``--table FILE.md`` writes
them as the Markdown table docs/async.md copies. Without ``--seeds`` the commands carry no ``--seed`` (the
default, 0), as in the one-seed runs.

Writes benchmarks/results/async_bench.json (raw records, the commands, machine and versions) and
docs/img/async-hogwild.png, docs/img/async-accuracy.png. Caution: this is a 2-core machine that other jobs
shared while it ran; the load average at the start and the end is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "async_bench.json"
IMG = ROOT / "docs" / "img"
DISTLEARN = str(Path(sys.executable).with_name("distlearn"))

# name -> (extra flags); the common flags are added in `command`
HOGWILD: dict[str, list[str]] = {
    "single 1 thread": ["--strategy", "single", "--threads", "1", "--batch-size", "64"],
    "single 2 threads": ["--strategy", "single", "--threads", "2", "--batch-size", "64"],
    "hogwild 2 processes": [
        "--strategy",
        "hogwild",
        "--workers",
        "2",
        "--threads",
        "1",
        "--batch-size",
        "128",
    ],
}
HOGWILD["buckwild 2 processes"] = [*HOGWILD["hogwild 2 processes"], "--buckwild"]  # 8-bit shared weights
AVERAGING = {
    "sync": ["--strategy", "sync", "--workers", "2"],
    "local-sgd k=4": ["--strategy", "local-sgd", "--workers", "2", "--average-every", "4"],
    "local-sgd k=16": ["--strategy", "local-sgd", "--workers", "2", "--average-every", "16"],
    "easgd tau=4": ["--strategy", "easgd", "--workers", "2", "--elastic-tau", "4"],
}


def command(args: argparse.Namespace, flags: list[str], out: Path, seed: int | None = None) -> list[str]:
    seeded = [] if seed is None else ["--seed", str(seed)]
    return [
        DISTLEARN, "train", "--dataset", "fashion-mnist", "--model", args.model, "--optimizer", "momentum",
        "--lr", str(args.lr), "--optimizer-option", "momentum=0.9", "--epochs", str(args.epochs),
        "--eval-every", str(args.eval_every), "--test-samples", str(args.test_samples),
        "--train-samples", str(args.train_samples), "--no-checkpoints", "--progress", "off",
        "--tensorboard", "off", "--quiet", "--out", str(out),
        *flags, *seeded,
    ]  # fmt: skip


def read_run(out: Path) -> dict:
    """The evaluating rank's eval records and the summary of every rank's metrics file."""
    evals, summaries = [], []
    for path in sorted(out.glob("metrics*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "eval":
                evals.append({k: record[k] for k in ("step", "wall_time", "accuracy", "loss")})
            elif record["kind"] == "summary":
                summaries.append(record)
    return {"evals": sorted(evals, key=lambda e: e["wall_time"]), "summaries": summaries}


def run_one(
    args: argparse.Namespace, name: str, flags: list[str], scratch: Path, seed: int | None = None
) -> dict:
    out = scratch / name.replace(" ", "-").replace("=", "")
    line = command(args, flags, out, seed)
    print(f"== {name}: {' '.join(line[1:])}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(line, timeout=args.timeout, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    run = read_run(out)
    trainers = [s for s in run["summaries"] if s.get("samples_per_s")]
    train_seconds = max(s["extra"]["train_seconds"] for s in trainers)
    samples = sum(s["extra"]["steps"] * s["extra"]["global_batch"] / s["extra"]["replicas"] for s in trainers)
    reached = next((e for e in run["evals"] if e["accuracy"] >= args.target), None)
    result = {
        **({} if seed is None else {"seed": seed}),
        "command": "distlearn " + " ".join(line[1:]).replace(str(out), "OUT"),
        "process_wall_s": wall,
        "train_seconds": train_seconds,
        "samples": samples,
        "samples_per_s": samples / train_seconds,  # every process's examples over the slowest's training time
        "final_accuracy": run["evals"][-1]["accuracy"] if run["evals"] else None,
        "best_accuracy": max((e["accuracy"] for e in run["evals"]), default=None),
        "time_to_target_s": reached["wall_time"] if reached else None,
        "evals": run["evals"],
    }
    print(f"   {result['samples_per_s']:,.0f} samples/s, final acc {result['final_accuracy']:.4f}, "
          f"time to {args.target:.0%}: {result['time_to_target_s']}", flush=True)  # fmt: skip
    return result


def mean_std(values: list[float]) -> list[float]:
    """[mean, sample standard deviation] (0 for one value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(runs: list[dict]) -> dict:
    """One configuration over its seeds: mean and std of the final and best accuracy and of samples/s; time to
    the target over the runs that reached it (``reached`` counts them)."""
    hits = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
    return {
        "seeds": [r["seed"] for r in runs],
        "final_accuracy": mean_std([r["final_accuracy"] for r in runs]),
        "best_accuracy": mean_std([r["best_accuracy"] for r in runs]),
        "samples_per_s": mean_std([r["samples_per_s"] for r in runs]),
        "time_to_target_s": mean_std(hits) if hits else None,
        "reached": len(hits),
    }


def table(results: dict) -> str:
    """The Markdown table of a ``--seeds`` run: every configuration's summary, accuracies in %."""
    seeds = len(next(iter({**results["hogwild"], **results["averaging"]}.values()))["summary"]["seeds"])
    machine = results.get("machine", {})
    if "load_at_start" in machine and "load_at_end" in machine:  # the 1-minute load averages
        loads = (machine["load_at_start"][0], machine["load_at_end"][0])
        condition = f"load {min(loads):.1f}-{max(loads):.1f}"
    else:
        condition = "loaded"
    lines = [
        f"| run | final accuracy (%, n = {seeds}) | best accuracy (%) | samples/s ({condition}) "
        f"| time to {results['target']:.0%} (s, {condition}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for part in ("hogwild", "averaging"):
        for name, config in results[part].items():
            s = config["summary"]
            final, best, speed = s["final_accuracy"], s["best_accuracy"], s["samples_per_s"]
            if s["time_to_target_s"] is None:
                reach = f"not reached (0 of {len(s['seeds'])})"
            else:
                reach = "{:.1f} ± {:.1f}".format(*s["time_to_target_s"])
                if s["reached"] < len(s["seeds"]):
                    reach += f" ({s['reached']} of {len(s['seeds'])} reached)"
            lines.append(
                f"| {name} | {100 * final[0]:.2f} ± {100 * final[1]:.2f} | {100 * best[0]:.2f} ± "
                f"{100 * best[1]:.2f} | {speed[0]:,.0f} ± {speed[1]:,.0f} | {reach} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, filename, title in (
        ("hogwild", "async-hogwild.png", "Hogwild! vs one process (per-update batch 64)"),
        ("averaging", "async-accuracy.png", "local SGD and EASGD vs sync (2 workers, B = 128)"),
    ):
        figure, axis = plt.subplots(figsize=(6.4, 4))
        if not results[key]:
            continue
        for index, (name, run) in enumerate(results[key].items()):
            color = f"C{index}"
            for number, seeded in enumerate(run.get("runs", [run])):  # every seed's curve, one colour
                if "summary" in run:
                    speed = f"mean {run['summary']['samples_per_s'][0]:,.0f}"
                else:
                    speed = f"{run['samples_per_s']:,.0f}"
                label = f"{name} ({speed} samples/s)" if number == 0 else None
                axis.plot([e["wall_time"] for e in seeded["evals"]], [e["accuracy"] for e in seeded["evals"]],
                          marker=".", color=color, alpha=0.8, label=label)  # fmt: skip
        axis.axhline(results["target"], color="grey", lw=0.8, ls="--")
        seeds = len(results.get("seeds") or [0])
        if seeds > 1:
            loads = (results["machine"]["load_at_start"][0], results["machine"]["load_at_end"][0])
            title += f"\n{seeds} seeds, load average {min(loads):.0f}-{max(loads):.0f} on 2 cores"
        axis.set(xlabel="wall time (s, from process start)", ylabel="test accuracy")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(IMG / filename.replace(".png", f"{suffix}.png"), dpi=110)
        plt.close(figure)


def run_seeds(args: argparse.Namespace, runs: dict[str, list[str]], scratch: Path) -> dict:
    """Every configuration once per seed, the order rotated per seed; each configuration's runs, summary and
    samples/s per seed (``trials_samples_per_s``, seed order, for the speed-up ratios)."""
    names = list(runs)
    done: dict[str, list[dict]] = {name: [] for name in names}
    for index, seed in enumerate(args.seeds):
        place = scratch / f"seed{seed}"
        place.mkdir(exist_ok=True)
        for name in names[index % len(names) :] + names[: index % len(names)]:
            done[name].append(run_one(args, name, runs[name], place, seed))
    part = {}
    for name in names:
        mine = sorted(done[name], key=lambda r: args.seeds.index(r["seed"]))
        part[name] = {
            "command": mine[0]["command"].replace(f" --seed {mine[0]['seed']}", " --seed SEED"),
            "summary": summarise(mine),
            "trials_samples_per_s": [r["samples_per_s"] for r in mine],
            "runs": mine,
        }
    return part


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--trials", type=int, default=3, help="Hogwild part: interleaved trials of each run")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed (replaces --trials)")
    parser.add_argument("--only", help="comma-separated configurations to run (default: all of the part)")
    parser.add_argument("--table", default=None, help="with --seeds: write the Markdown table of means here")
    parser.add_argument("--part", choices=["all", "hogwild", "averaging"], default="all")
    parser.add_argument("--out", default=str(RESULTS), help="raw results (JSON); earlier ones are kept")
    parser.add_argument("--plot-suffix", default="", help="appended to the plot names in docs/img")
    args = parser.parse_args()
    results: dict = {
        "argv": sys.argv,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "load_at_start": os.getloadavg(),
        },  # fmt: skip
        "target": args.target,
        "seeds": args.seeds,
        "hogwild": {},
        "averaging": {},
    }
    if args.table and not args.seeds:
        parser.error("--table needs --seeds")
    with tempfile.TemporaryDirectory(prefix="async-bench-") as scratch:
        parts = [("hogwild", HOGWILD), ("averaging", AVERAGING)]
        for part, runs in parts:
            if args.part not in ("all", part):
                continue
            if args.only:
                unknown = set(args.only.split(",")) - set(HOGWILD) - set(AVERAGING)
                if unknown:
                    known = [*HOGWILD, *AVERAGING]
                    parser.error(f"--only: no configuration {sorted(unknown)}; choose from {known}")
                runs = {name: flags for name, flags in runs.items() if name in args.only.split(",")}
            names = list(runs)
            if args.seeds:
                results[part] = run_seeds(args, runs, Path(scratch))
                continue
            trials: dict[str, list[dict]] = {name: [] for name in names}
            for trial in range(args.trials if part == "hogwild" else 1):
                # Rotated order, so a drift in the other jobs' load falls on every configuration alike: one
                # trial each, one after the other, let the lone 1-thread baseline take the slow stretch and
                # gave 2.29x (docs/async.md, benchmarks/hogwild_baseline.py).
                for name in names[trial % len(names) :] + names[: trial % len(names)]:
                    scratch_trial = Path(scratch) / f"trial{trial}"
                    scratch_trial.mkdir(exist_ok=True)
                    trials[name].append(run_one(args, name, runs[name], scratch_trial))
            for name in names:  # the trial with the median samples/s stands for the configuration
                ranked = sorted(trials[name], key=lambda r: r["samples_per_s"])
                results[part][name] = {**ranked[len(ranked) // 2], "trials_samples_per_s": [
                    r["samples_per_s"] for r in trials[name]]}  # fmt: skip
    results["machine"]["load_at_end"] = os.getloadavg()
    hogwild = results["hogwild"]
    if "single 1 thread" in hogwild and {"hogwild 2 processes", "single 2 threads"} <= hogwild.keys():
        # the median over trials of each trial's ratio (the runs of one trial are close in time)
        base = hogwild["single 1 thread"]["trials_samples_per_s"]

        def ratio(name: str) -> float:
            return statistics.median(
                a / b for a, b in zip(hogwild[name]["trials_samples_per_s"], base, strict=True)
            )

        results["hogwild_speedup_over_1_thread"] = ratio("hogwild 2 processes")
        if args.seeds and len(base) > 1:  # each seed's ratio: the runs of one seed are close in time
            per_seed = [a / b for a, b in zip(hogwild["hogwild 2 processes"]["trials_samples_per_s"], base,
                                              strict=True)]  # fmt: skip
            results["hogwild_speedup_per_seed"] = per_seed
            results["hogwild_speedup_mean_std"] = [statistics.fmean(per_seed), statistics.stdev(per_seed)]
        results["two_threads_speedup_over_1_thread"] = ratio("single 2 threads")
        print(f"hogwild 2 processes: {results['hogwild_speedup_over_1_thread']:.2f}x the 1-thread process; "
              f"2 threads: {results['two_threads_speedup_over_1_thread']:.2f}x")  # fmt: skip
    out = Path(args.out)
    if args.table:
        Path(args.table).write_text(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    IMG.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot_suffix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
