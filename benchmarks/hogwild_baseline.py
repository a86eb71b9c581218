"""Why Hogwild! with 2 processes measured more than 2x one process on 2 cores: the baselines side by side.

docs/async.md reported 2.29x the single-threaded process's samples/s for Hogwild! with 2 processes (one
trial each, run one after the other). Two processes of one thread each cannot exceed 2x one such process
unless each runs faster than the lone process did. This script measures, in interleaved rounds (every
configuration once per round, in a rotated order, so drifts of the other jobs' load fall on all alike):

* ``single 1 thread``: the original baseline (``--strategy single --threads 1 --batch-size 64``);
* ``hogwild 2 processes``: ``--strategy hogwild --workers 2 --threads 1 --batch-size 128`` (64 per update);
* ``2 independent singles``: two ``single 1 thread`` processes started together, sharing nothing -- the
  ceiling for any 2-process method on these 2 cores, measured under the same load as Hogwild!.

Two measures per trial. Wall: samples/s is every process's training examples over the slowest process's
training time (as in benchmarks/async_bench.py), which depends on what else the cores run. CPU: the command's
user + system CPU seconds (``os.wait4``: the process and the processes it waited for) less those of the same
command stopped after one step (``--steps 1``: start-up, data loading, the final evaluation), per training
example -- what one example costs a process, which the other jobs' load does not change much.
The result file also holds, from the 2.29x run's own evaluations, each configuration's fastest, median and
slowest milliseconds per step (``old_run_stretches``; ``--stretches-only`` adds them to an existing file).
Evaluation during training is off (``--eval-every 0``; its time is excluded from ``train_seconds`` anyway).
Writes benchmarks/results/hogwild_baseline.json (every trial, the load averages, the commands)::

    python benchmarks/hogwild_baseline.py --rounds 2 --epochs 1 --train-samples 12000
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from async_bench import DISTLEARN, HOGWILD, ROOT, read_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "hogwild_baseline.json"
OLD_RUN = ROOT / "benchmarks" / "results" / "async_bench-2026-11-30-lenet-90.json"  # the 2.29x
SINGLE = HOGWILD["single 1 thread"]
# name -> (flags, extra environment, how many copies run at once)
CONFIGS: dict[str, tuple[list[str], dict[str, str], int]] = {
    "single 1 thread": (SINGLE, {}, 1),
    "hogwild 2 processes": (HOGWILD["hogwild 2 processes"], {}, 1),
    "2 independent singles": (SINGLE, {}, 2),
}


def command(args: argparse.Namespace, flags: list[str], out: Path, steps: int | None = None) -> list[str]:
    return [
        DISTLEARN, "train", "--dataset", "fashion-mnist", "--model", args.model, "--optimizer", "momentum",
        "--lr", "0.02", "--optimizer-option", "momentum=0.9", "--epochs", str(args.epochs),
        "--eval-every", "0", "--test-samples", str(args.test_samples),
        "--train-samples", str(args.train_samples), "--no-checkpoints", "--progress", "off",
        "--tensorboard", "off", "--quiet", "--out", str(out), *flags,
        *(["--steps", str(steps)] if steps else []),
    ]  # fmt: skip


def launch(args: argparse.Namespace, name: str, outs: list[Path], steps: int | None) -> tuple[float, float]:
    """Run the configuration's processes together; their wall seconds and CPU seconds (user + system)."""
    flags, env, _ = CONFIGS[name]
    started, cpu, procs = time.perf_counter(), 0.0, []
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "log.txt").open("w")
        procs.append(subprocess.Popen(command(args, flags, out, steps), env={**os.environ, **env}, stdout=log,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    deadline = time.monotonic() + args.timeout
    for proc, out in zip(procs, outs, strict=True):
        while True:  # bounded: the deadline, then the process is killed
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"{name} ran past --timeout {args.timeout} s")
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{(out / 'log.txt').read_text()[-3000:]}")
        cpu += usage.ru_utime + usage.ru_stime
    return time.perf_counter() - started, cpu


def trial(args: argparse.Namespace, name: str, scratch: Path, round_: int) -> dict:
    copies = CONFIGS[name][2]
    slug = name.replace(" ", "-").replace(",", "").replace("=", "")
    outs = [scratch / f"r{round_}-{slug}-{i}" for i in range(copies)]
    load = os.getloadavg()[0]
    wall, cpu = launch(args, name, outs, None)
    _, cpu_start = launch(args, name, [o.with_name(o.name + "-1step") for o in outs], 1)
    per_process, samples, slowest = [], 0.0, 0.0
    for out in outs:
        for s in read_run(out)["summaries"]:
            if not s.get("samples_per_s"):
                continue
            extra = s["extra"]
            n = extra["steps"] * extra["global_batch"] / extra["replicas"]
            per_process.append(n / extra["train_seconds"])
            samples += n
            slowest = max(slowest, extra["train_seconds"])
    record = {"round": round_, "load_1min_at_start": load, "wall_s": wall, "samples": samples,
              "samples_per_s": samples / slowest, "per_process_samples_per_s": per_process,
              "cpu_s": cpu, "cpu_s_one_step": cpu_start,
              "cpu_ms_per_example": 1000 * (cpu - cpu_start) / samples}  # fmt: skip
    print(f"round {round_} {name:36s} {record['samples_per_s']:7.0f} samples/s (per process "
          f"{', '.join(f'{p:.0f}' for p in per_process)}), {record['cpu_ms_per_example']:.3f} CPU ms/example "
          f"(load {load:.1f})", flush=True)  # fmt: skip
    return record


def stretches(path: Path) -> dict[str, dict[str, float]]:
    """Milliseconds per step between consecutive evaluations of each run of an async_bench result file.

    Each interval holds 200 steps and one evaluation of the same size for every run, so the fastest and the
    median interval of one run show how much its speed varied while it ran (the other jobs' load).
    """
    out = {}
    for name, run in json.loads(path.read_text())["hogwild"].items():
        evals = run["evals"]
        per_step = [1000 * (b["wall_time"] - a["wall_time"]) / (b["step"] - a["step"])
                    for a, b in zip(evals, evals[1:], strict=False) if b["step"] > a["step"]]  # fmt: skip
        out[name] = {"fastest_ms_per_step": min(per_step), "median_ms_per_step": statistics.median(per_step),
                     "slowest_ms_per_step": max(per_step), "intervals": len(per_step)}  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--stretches-only", action="store_true", help="add old_run_stretches to --out")
    args = parser.parse_args()
    if args.stretches_only:
        record = json.loads(Path(args.out).read_text())
        record.update(old_run=OLD_RUN.name, old_run_stretches=stretches(OLD_RUN))
        Path(args.out).write_text(json.dumps(record, indent=1))
        return 0
    names = list(CONFIGS)
    trials: dict[str, list[dict]] = {name: [] for name in names}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hogwild-baseline-") as scratch:
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotated each round
            for name in order:
                trials[name].append(trial(args, name, Path(scratch), round_))
                partial = {"argv": sys.argv, "partial": True, "trials": trials}  # kept if a later trial dies
                Path(args.out).write_text(json.dumps(partial, indent=1))
    base = [t["samples_per_s"] for t in trials["single 1 thread"]]
    summary = {}
    for name, runs in trials.items():
        ratios = [
            t["samples_per_s"] / b for t, b in zip(runs, base, strict=True)
        ]  # against the same round's baseline
        summary[name] = {
            "samples_per_s_median": statistics.median(t["samples_per_s"] for t in runs),
            "ratio_to_single_1_thread_same_round": ratios,
            "ratio_median": statistics.median(ratios),
            "cpu_ms_per_example": [t["cpu_ms_per_example"] for t in runs],
            "cpu_ms_per_example_median": statistics.median(t["cpu_ms_per_example"] for t in runs),
        }
        print(f"{name:36s} median {summary[name]['samples_per_s_median']:7.0f} samples/s, "
              f"{summary[name]['ratio_median']:.2f}x the same round's single 1 thread "
              f"({', '.join(f'{r:.2f}' for r in ratios)}); "
              f"{summary[name]['cpu_ms_per_example_median']:.3f} CPU ms/example")  # fmt: skip
    hog = trials["hogwild 2 processes"]
    two = trials["2 independent singles"]
    summary["hogwild_over_2_independent_singles_same_round"] = [
        h["samples_per_s"] / t["samples_per_s"] for h, t in zip(hog, two, strict=True)
    ]
    results = {
        "argv": sys.argv,
        "commands": {
            name: "distlearn "
            + " ".join(command(args, CONFIGS[name][0], Path("OUT"))[1:])
            + (f" (env {CONFIGS[name][1]})" if CONFIGS[name][1] else "")
            + (f" x{CONFIGS[name][2]} at once" if CONFIGS[name][2] > 1 else "")
            for name in names
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "load_at_start": load_start,
            "load_at_end": os.getloadavg(),
        },  # fmt: skip
        "trials": trials,
        "old_run": OLD_RUN.name,
        "old_run_stretches": stretches(OLD_RUN),
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
