"""Stragglers and communication periods: accuracy against updates and against simulated time (issue 24).

Part ``a`` (Chen et al. 2016, "Revisiting distributed synchronous SGD"; Zhang, Gupta, Lian & Liu 2016,
"Staleness-aware async-SGD"): at ``R`` workers, one of them a straggler (``--straggler LAST:DELAY_MS``,
the last worker rank), compare

* ``sync``: our synchronous strategy (an allreduce per step: every step waits for the straggler);
* ``backup``: the parameter server with ``R + b`` workers, each step on the first ``R`` gradients
  (``--backup-workers b``), the straggler among the ``R + b``;
* ``async``: Downpour, the parameter server without staleness-aware rates;
* ``staleness-aware``: the same with ``--staleness-aware`` (each gradient divided by its staleness).

Part ``b`` (Zhang, Choromanska & LeCun 2015, "Deep learning with Elastic Averaging SGD"): at ``R`` workers
and communication period ``tau`` in {1, 4, 16}: asynchronous EASGD (``--easgd-mode async --elastic-tau``),
Downpour with ``tau`` local steps per push and pull (``--strategy ps --local-steps``), and local SGD
(``--average-every``); test error against steps. No stragglers; the simulated clock is on.

Every run is a real ``distlearn train`` job (the strategies' own code, CPU, gloo): an MLP on a seeded subset
of Fashion-MNIST's training set, evaluated on the first ``--test-samples`` images of its test set (a fixed
held-out set), plain SGD at one learning rate for every method, a fixed global batch ``B`` (``B / R`` per
worker and step). Where processes outnumber the cores wall time means little, so each eval also carries the
simulated time (``distlearn.train.straggler``): the CPU time of each step plus its injected delay, the
slowest replica's after a synchronous step. The parameter server's synchronous groups (backup workers) wait
at the server, which keeps no clock: their simulated time is replayed here (:func:`replay_backup`) from
each worker's measured CPU time per step and its (seeded, so known) delays; the same replay for ``sync``
(:func:`replay_sync`) is checked against the trainer's own clock. Staleness (mean, max) comes from the
servers' update logs (``ps-server0.json``).

    python benchmarks/straggler_bench.py --part a --workers 4 --seeds 0 1 2
    python benchmarks/straggler_bench.py --part b --workers 4 --periods 1 4 16 --seeds 0 1 2
    python benchmarks/straggler_bench.py --table      # the .md tables from the result files

Writes benchmarks/results/stragglers-<part>-R<R>.json (every run, its command, per-rank numbers, curves;
results are appended run by run, so a stopped bench keeps what finished) and stragglers.md (the tables),
and benchmarks/results/stragglers-summary.json (mean, std, seeds and file per row, for docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from distlearn.train.straggler import step_delay_ms  # noqa: E402

COMMON = {
    "dataset": "fashion-mnist",
    "model": "mlp",
    "optimizer": "sgd",
    "train_samples": 8000,
    "test_samples": 2000,
    "batch_size": 64,
    "threads": 1,
}


def method_flags(
    part: str, method: str, workers: int, period: int, backup: int
) -> tuple[str, int, list[str]]:
    """(strategy, processes, flags) of one method; the straggler is the job's last rank."""
    if part == "a":
        return {
            "sync": ("sync", workers, []),
            "backup": ("ps", 1 + workers + backup, ["--backup-workers", str(backup)]),
            "async": ("ps", 1 + workers, []),
            "staleness-aware": ("ps", 1 + workers, ["--staleness-aware"]),
        }[method]
    return {
        "easgd": ("easgd", 1 + workers, ["--easgd-mode", "async", "--elastic-tau", str(period)]),
        "downpour": ("ps", 1 + workers, ["--local-steps", str(period)]),
        "local-sgd": ("local-sgd", workers, ["--average-every", str(period)]),
    }[method]


def train_command(args: argparse.Namespace, method: str, seed: int, period: int, out: Path) -> list[str]:
    strategy, processes, flags = method_flags(args.part, method, args.workers, period, args.backup)
    command = [
        sys.executable,
        "-m",
        "distlearn",
        "train",
        "--strategy",
        strategy,
        "--workers",
        str(processes),
    ]
    for key, value in COMMON.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command += ["--lr", str(args.lr), "--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    command += ["--log-every", str(args.eval_every), "--seed", str(seed), "--sim-clock"]
    if args.part == "a" and args.delay_ms > 0:
        command += ["--straggler", f"{processes - 1}:{args.delay_ms:g}"]
        command += ["--straggler-sleep-scale", str(args.sleep_scale)]
    if args.part == "a" and args.dist != "none":
        command += ["--straggler-dist", args.dist, "--straggler-sleep-scale", str(args.sleep_scale)]
    command += ["--no-checkpoints", "--progress", "off", "--tensorboard", "off", "--quiet", "--overwrite"]
    return command + ["--out", str(out), *flags]


def read_records(run: Path) -> dict[int, list[dict]]:
    ranks: dict[int, list[dict]] = {}
    for path in run.glob("metrics*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            ranks.setdefault(record["rank"], []).append(record)
    return ranks


def durations(
    config: argparse.Namespace, seed: int, rank: int, steps: int, cpu_per_step: float
) -> list[float]:
    """Seconds of each of ``rank``'s steps on the simulated clock: its mean CPU time plus its delay."""
    spec = argparse.Namespace(straggler=config.straggler, straggler_dist=config.straggler_dist, seed=seed)
    return [cpu_per_step + step_delay_ms(spec, rank, t) / 1000 for t in range(steps)]


def replay_sync(steps: dict[int, list[float]]) -> list[float]:
    """A synchronous job's clock after each step: the sum over steps of the slowest worker's duration."""
    clock, times = 0.0, []
    for t in range(min(len(d) for d in steps.values())):
        clock += max(d[t] for d in steps.values())
        times.append(clock)
    return times


def replay_backup(steps: dict[int, list[float]], takers: int, main: int) -> list[float]:
    """When each of worker ``main``'s steps ends in a backup-worker job (Chen et al.): a step is applied
    when ``takers`` gradients computed on the current version have arrived; their workers wait for it; a
    gradient of an older version is dropped and its worker goes on at once with the current weights."""
    done = {w: 0 for w in steps}
    version, count, waiting, times = 0, 0, [], []
    seen = {w: 0 for w in steps}
    finish = {w: d[0] for w, d in steps.items()}
    while done[main] < len(steps[main]):
        running = [w for w in steps if w not in waiting and done[w] < len(steps[w])]
        if not running:
            break
        w = min(running, key=lambda u: (finish[u], u))
        now = finish[w]
        if seen[w] == version:
            count += 1
            waiting.append(w)
            if count < takers:
                continue
            version, count = version + 1, 0
            movers, waiting = waiting, []
        else:
            movers = [w]  # late: dropped, answered with the current weights
        for u in movers:
            done[u] += 1
            seen[u] = version
            if u == main:
                times.append(now)
            finish[u] = now + steps[u][done[u]] if done[u] < len(steps[u]) else math.inf
    return times


def collect(args: argparse.Namespace, method: str, seed: int, period: int, out: Path) -> dict[str, Any]:
    ranks = read_records(out)
    main = next(r for r, records in ranks.items() if any(x["kind"] == "eval" for x in records))
    evals = [x for x in ranks[main] if x["kind"] == "eval"]
    summaries = {
        r: next(x for x in records if x["kind"] == "summary")
        for r, records in ranks.items()
        if any(x["kind"] == "summary" for x in records)
    }
    per_rank = {
        str(r): {
            "steps": s["step"],
            "compute_cpu_s": s["extra"].get("compute_cpu_s"),
            "straggler_delay_s": s["extra"].get("straggler_delay_s"),
            "sim_time_s": s["extra"].get("sim_time_s"),
            "train_seconds": s["extra"].get("train_seconds"),
        }
        for r, s in sorted(summaries.items())
    }
    curve = [
        {"step": x["step"], "accuracy": x["accuracy"], "sim_time_s": x["extra"].get("sim_time_s"),
         "wall_time_s": x["wall_time"]}
        for x in evals
    ]  # fmt: skip
    result: dict[str, Any] = {"method": method, "seed": seed, "period": period, "ranks": per_rank}
    server = out / "ps-server0.json"
    if server.exists():
        report = json.loads(server.read_text())
        staleness = [u[2] for u in report["updates"]]
        result["server"] = {
            "versions": report["version"], "pushes": report["pushes"], "dropped": report["dropped"],
            "mean_staleness": statistics.fmean(staleness) if staleness else None,
            "max_staleness": max(staleness) if staleness else None,
        }  # fmt: skip
    _, processes, _ = method_flags(args.part, method, args.workers, period, args.backup)
    fixed = (f"{processes - 1}:{args.delay_ms:g}",) if args.part == "a" and args.delay_ms > 0 else ()
    spec = argparse.Namespace(straggler=fixed, straggler_dist=args.dist if args.part == "a" else "none")
    workers = {int(r): v for r, v in per_rank.items() if v["steps"] and v["compute_cpu_s"] is not None}
    steps = {
        r: durations(spec, seed, r, v["steps"], v["compute_cpu_s"] / v["steps"]) for r, v in workers.items()
    }
    if method == "backup":
        replayed = replay_backup(steps, takers=args.workers, main=main)
        for point in curve:
            point["sim_time_s"] = replayed[point["step"] - 1] if point["step"] <= len(replayed) else None
        result["clock"] = "replayed (replay_backup)"
    elif method == "sync":
        replayed = replay_sync(steps)
        result["clock"] = "trainer (max over replicas per step)"
        result["replay_check"] = {"trainer_s": curve[-1]["sim_time_s"], "replay_mean_cpu_s": replayed[-1]}
    else:
        result["clock"] = "trainer (the main worker's own clock)" if args.part == "a" else "trainer"
    result["curve"] = curve
    result["final_accuracy"] = curve[-1]["accuracy"]
    result["final_sim_time_s"] = curve[-1]["sim_time_s"]
    return result


def result_file(args: argparse.Namespace) -> Path:
    tag = f"-{args.tag}" if args.tag else ""
    return RESULTS / f"stragglers-{args.part}-R{args.workers}{tag}.json"


def run(args: argparse.Namespace) -> None:
    path = result_file(args)
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {"runs": []}
    data.update(
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        setting={**COMMON, "lr": args.lr, "steps": args.steps, "eval_every": args.eval_every,
                 "workers": args.workers, "backup_workers": args.backup, "delay_ms": args.delay_ms,
                 "straggler_dist": args.dist, "sleep_scale": args.sleep_scale},
        machine=f"{platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the start",
    )  # fmt: skip
    methods = args.methods or (
        ["sync", "backup", "async", "staleness-aware"]
        if args.part == "a"
        else ["easgd", "downpour", "local-sgd"]
    )
    periods = args.periods if args.part == "b" else [1]
    with tempfile.TemporaryDirectory(prefix="straggler-bench-") as tmp:
        for seed in args.seeds:
            for period in periods:
                for method in methods:
                    out = Path(tmp) / f"{method}-p{period}-s{seed}"
                    command = train_command(args, method, seed, period, out)
                    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
                    started = time.perf_counter()
                    done = subprocess.run(
                        command, capture_output=True, text=True, env=env, timeout=args.timeout
                    )
                    if done.returncode != 0:
                        print(f"{method} p{period} s{seed}: FAILED\n{done.stderr[-2000:]}", flush=True)
                        continue
                    result = collect(args, method, seed, period, out)
                    result["command"] = " ".join(shlex.quote(c) for c in command[1:]).replace(str(out), "OUT")
                    result["process_seconds"] = time.perf_counter() - started
                    data["runs"] = [
                        r for r in data["runs"]
                        if (r["method"], r["seed"], r["period"]) != (method, seed, period)
                    ] + [result]  # fmt: skip
                    path.write_text(json.dumps(data, indent=1) + "\n")
                    print(
                        f"{method} p{period} s{seed}: {result['final_accuracy']:.4f} at sim "
                        f"{result['final_sim_time_s']:.2f} s ({result['process_seconds']:.0f} s)",
                        flush=True,
                    )


# -- tables -----------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def accuracy_at(curve: list[dict], key: str, budget: float) -> float | None:
    """The last evaluated accuracy at or before ``budget`` on axis ``key``."""
    seen = [p["accuracy"] for p in curve if p[key] is not None and p[key] <= budget + 1e-9]
    return seen[-1] if seen else None


TARGET = 0.78
"""The test accuracy whose simulated time-to-reach the tables report (sync reaches it within 300 steps)."""


def first_at(curve: list[dict], target: float) -> float | None:
    """The simulated time of the first evaluation at or above ``target`` (None: never reached)."""
    hits = (p["sim_time_s"] for p in curve if p["accuracy"] >= target and p["sim_time_s"] is not None)
    return next(hits, None)


def rows(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    runs = data["runs"]
    out = []
    keys = sorted({(r["method"], r["period"]) for r in runs}, key=lambda k: (k[1], k[0]))
    # the simulated-time budget: the time the fastest method's mean run took to finish
    finish = {k: [r["final_sim_time_s"] for r in runs if (r["method"], r["period"]) == k] for k in keys}
    budget = min(statistics.fmean(v) for v in finish.values() if v and None not in v)
    for method, period in keys:
        mine = [r for r in runs if (r["method"], r["period"]) == (method, period)]
        final = [100 * r["final_accuracy"] for r in mine]
        at_budget = [accuracy_at(r["curve"], "sim_time_s", budget) for r in mine]  # None: no eval by then
        row = {
            "method": method, "period": period, "seeds": sorted(r["seed"] for r in mine),
            "final_accuracy": mean_std(final),
            "accuracy_at_budget": mean_std([100 * a for a in at_budget]) if None not in at_budget else None,
            "budget_sim_s": budget,
            "sim_time_s": mean_std([r["final_sim_time_s"] for r in mine]),
            "steps": mine[0]["curve"][-1]["step"], "file": str(path.relative_to(ROOT)),
        }  # fmt: skip
        reached = [first_at(r["curve"], TARGET) for r in mine]
        hits = [t for t in reached if t is not None]
        row["target_accuracy"] = 100 * TARGET
        row["sim_time_to_target_s"] = mean_std(hits) if hits else None
        row["reached_target"] = f"{len(hits)}/{len(mine)}"
        servers = [r["server"] for r in mine if "server" in r]
        if servers:
            row["mean_staleness"] = mean_std([s["mean_staleness"] for s in servers])
            row["max_staleness"] = max(s["max_staleness"] for s in servers)
            row["dropped"] = mean_std([s["dropped"] for s in servers])
            row["server_versions"] = mean_std([s["versions"] for s in servers])
        out.append(row)
    return out


def fmt(pair: tuple[float, float] | None, digits: int = 2) -> str:
    return "-" if pair is None else f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}"


def tables() -> None:
    lines = ["# Stragglers and communication periods (benchmarks/straggler_bench.py)", ""]
    summary = []
    for path in sorted(RESULTS.glob("stragglers-*-R*.json")):
        data = json.loads(path.read_text())
        setting = data["setting"]
        lines += [f"## {path.name}", "", f"Command: `{data['command']}`", "",
                  f"Setting: {json.dumps(setting)}", f"Machine: {data['machine']}", ""]  # fmt: skip
        lines += [
            "| method | period | seeds | test acc. at end (%) | test acc. at equal sim time (%) "
            f"| sim time (s) | sim time to {100 * TARGET:.0f}% (s) | staleness mean | staleness max "
            "| dropped | server updates |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows(path):
            lines.append(
                f"| {row['method']} | {row['period']} | {len(row['seeds'])} | {fmt(row['final_accuracy'])} | "
                f"{fmt(row['accuracy_at_budget'])} (budget {row['budget_sim_s']:.2f} s) | "
                f"{fmt(row['sim_time_s'])} | {fmt(row['sim_time_to_target_s'])} ({row['reached_target']}) "
                f"| {fmt(row.get('mean_staleness'))} | {row.get('max_staleness', '-')} | "
                f"{fmt(row.get('dropped'), 0)} | {fmt(row.get('server_versions'), 0)} |"
            )
            summary.append(row)
        lines.append("")
    for path in sorted(RESULTS.glob("stragglers-*-R*.json")):
        plot(path)
    (RESULTS / "stragglers.md").write_text("\n".join(lines))
    (RESULTS / "stragglers-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def plot(path: Path) -> None:
    """docs/img/<result name>.png: mean test accuracy over seeds against steps and against simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(path.read_text())["runs"]
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for method, period in sorted({(r["method"], r["period"]) for r in runs}):
        mine = [r for r in runs if (r["method"], r["period"]) == (method, period)]
        steps = sorted({p["step"] for r in mine for p in r["curve"]})
        steps = [s for s in steps if all(any(p["step"] == s for p in r["curve"]) for r in mine)]
        point = {(id(r), p["step"]): p for r in mine for p in r["curve"]}
        accuracy = [statistics.fmean(100 * point[id(r), s]["accuracy"] for r in mine) for s in steps]
        times = [statistics.fmean(point[id(r), s]["sim_time_s"] or math.nan for r in mine) for s in steps]
        label = method if "-a-" in path.name else f"{method} tau={period}"
        by_step.plot(steps, accuracy, marker="o", label=label)
        by_time.plot(times, accuracy, marker="o", label=label)
    seeds = len({r["seed"] for r in runs})
    by_step.set(xlabel="steps of the main worker (B = 64 examples each)", ylabel="test accuracy (%)")
    by_time.set(xlabel="simulated time (s)", ylabel="test accuracy (%)")
    by_step.set_title(f"{path.name}: mean of {seeds} seed(s)", fontsize=9)
    by_time.set_xscale("log")
    by_step.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "img" / path.with_suffix(".png").name, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["a", "b"], default="a")
    parser.add_argument("--workers", type=int, default=4, help="R: workers whose gradients make a step")
    parser.add_argument("--backup", type=int, default=1, help="part a: backup workers b")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--periods", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--delay-ms", type=float, default=6.0, help="part a: the straggler's delay per step")
    parser.add_argument("--dist", default="none", help="part a: a delay distribution for every rank")
    parser.add_argument("--sleep-scale", type=float, default=10.0, help="--straggler-sleep-scale")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--fresh", action="store_true", help="start the result file afresh")
    parser.add_argument("--table", action="store_true", help="only write the tables from the result files")
    args = parser.parse_args()
    if args.table:
        tables()
        return
    run(args)
    tables()


if __name__ == "__main__":
    main()
