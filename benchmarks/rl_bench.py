"""Distributed RL on CartPole-v1: time to solve and env steps/s of naive, A3C, Gorila and sync-pg.

R = 1 and 2, beside CleanRL's PPO run from its own source in the same session.

Claim checked: every algorithm solves CartPole-v1 (mean return >= 475 over the last 100 training episodes)
within 10 minutes on this 2-core machine, and A3C and sync-pg are no slower to solve than CleanRL's ppo.py.

Method: one warm-up run, then for every algorithm, R and seed a fresh ``python -m distlearn.rl.cli`` process
(stops when solved, capped at ``--time-limit``); "launch to solved" is that process's wall time (start-up and
teardown included, so an upper bound) and "train to solved" the time the run itself measured. The reference is
``cleanrl/ppo.py`` from a fetched snapshot of github.com/vwxyzjn/cleanrl (not copied into this repository),
run with its defaults on CartPole-v1 under a Python that has CleanRL's dependencies (gymnasium 0.29, tyro,
tensorboard; ``--reference-python``); its printed episode returns are timed as they arrive and the process is
stopped once solved. Every process gets ``OMP_NUM_THREADS=1``. Seeds are reported as mean ± std.

    python benchmarks/rl_bench.py --seeds 3                                 # the full run (about 15-25 min)
    python benchmarks/rl_bench.py --seeds 1 --algorithms sync-pg --workers 1 --no-reference   # a quick look

The reference needs the CleanRL source and a Python with gymnasium 0.29 (CleanRL's ppo.py reads the
``final_info`` that gymnasium 1.x no longer returns), e.g.::

    git -C <cleanrl checkout> show HEAD:cleanrl/ppo.py > /tmp/cleanrl/ppo.py
    python3 -m venv /tmp/cleanrl-venv
    echo <this venv's site-packages> > /tmp/cleanrl-venv/lib/python3.11/site-packages/main.pth
    /tmp/cleanrl-venv/bin/pip install gymnasium==0.29.1 tyro tensorboard

Raw results: benchmarks/results/rl_bench.json (command, machine, versions, every trial); curves:
docs/img/rl-curves.png; a GIF of the fastest sync-pg policy: docs/img/rl-cartpole.gif.
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
from collections import deque
from collections.abc import Callable
from pathlib import Path

from distlearn.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THRESHOLD = 475.0


def _env() -> dict[str, str]:
    # unbuffered: the reference's episode returns are timed as they are printed
    return dict(os.environ, OMP_NUM_THREADS="1", SDL_VIDEODRIVER="dummy", PYTHONUNBUFFERED="1")


# labels of the benchmark that are an algorithm with options
VARIANTS = {"a3c-ps": ("a3c", ("--servers", "1"))}  # A3C's shared model on a parameter-server rank


def run_ours(
    algorithm: str,
    workers: int,
    seed: int,
    out: Path,
    time_limit: float,
    env: str = "CartPole-v1",
    extra: tuple[str, ...] = (),
    runner: Callable[[list[str], dict[str, str], float], tuple[int, dict]] | None = None,
) -> dict:
    """One fresh process of ``distlearn.rl.cli``; ``runner(command, env, timeout)`` (default: a plain
    subprocess) runs it and returns its exit code and what it measured, which goes into the trial."""
    name, variant = VARIANTS.get(algorithm, (algorithm, ()))
    command = [
        sys.executable,
        "-m",
        "distlearn.rl.cli",
        name,
        *variant,
        "--env",
        env,
        "--workers",
        str(workers),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--time-limit",
        str(time_limit),
        "--quiet",
        "--overwrite",  # a rerun replaces the trial's earlier run directory
        *extra,
    ]
    start = time.perf_counter()
    if runner is None:
        timeout = time_limit + 180
        process = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
        exit_code, measured = process.returncode, {}
    else:
        exit_code, measured = runner(command, _env(), time_limit + 180)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = next((r for r in reversed(records) if r["kind"] == "summary"), records[-1])  # (a stopped run)
    solved = summary["extra"]["solved_seconds"] is not None
    curve = [(r["wall_time"], r["extra"]["episode_return"]) for r in records if r["kind"] == "train"]
    return {
        "algorithm": algorithm,
        "env": env,
        "workers": workers,
        "seed": seed,
        "exit_code": exit_code,
        "solved": solved,
        "launch_to_solved_s": wall if solved else None,
        "train_to_solved_s": summary["extra"]["solved_seconds"],
        "env_steps_to_solve": summary["extra"]["solved_env_steps"],
        "env_steps_per_s": summary["samples_per_s"] * (workers if algorithm == "sync-pg" else 1),
        "env_steps": summary["extra"]["env_steps"],
        "final_return": summary["extra"]["episode_return"],
        "wall_s": wall,
        "curve": curve,
        "staleness": summary["staleness"],
        "updates": summary["step"],
        **measured,
    }


def run_reference(python: str, script: Path, seed: int, time_limit: float) -> dict:
    command = [python, str(script), "--env-id", "CartPole-v1", "--seed", str(seed)]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=_env(), cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    recent: deque[float] = deque(maxlen=100)
    curve, solved_at, steps = [], None, 0
    try:
        for line in process.stdout:  # "global_step=4036, episodic_return=[11.]"
            now = time.perf_counter() - start
            if line.startswith("global_step="):
                step_text, return_text = line.split(", ")
                steps = int(step_text.split("=")[1])
                recent.append(float(return_text.split("=")[1].strip("[]\n")))
                if not curve or now - curve[-1][0] >= 2.0:
                    curve.append((now, sum(recent) / len(recent)))
                if len(recent) == 100 and sum(recent) / 100 >= THRESHOLD:
                    solved_at = (now, steps)
                    break
            if now > time_limit:
                break
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    wall = time.perf_counter() - start
    return {
        "algorithm": "cleanrl-ppo",
        "workers": 1,
        "seed": seed,
        "solved": solved_at is not None,
        "launch_to_solved_s": solved_at[0] if solved_at else None,
        "train_to_solved_s": None,
        "env_steps_to_solve": solved_at[1] if solved_at else None,
        "env_steps_per_s": steps / wall,
        "final_return": sum(recent) / len(recent) if recent else None,
        "wall_s": wall,
        "curve": curve,
    }


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not solved"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1, help="first seed of --seeds")
    parser.add_argument("--algorithms", default="sync-pg,a3c,naive,gorila", help="also: a3c-ps")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--time-limit", type=float, default=300.0, help="cap per run (seconds)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reference-python", default="/tmp/cleanrl-venv/bin/python")
    parser.add_argument("--reference-script", default="/tmp/cleanrl/ppo.py")
    parser.add_argument("--runs", default="/tmp/rl-bench-runs", help="where the runs' directories go")
    parser.add_argument("--gif", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--env", default="CartPole-v1", help="gymnasium id, e.g. MinAtar/Breakout-v1")
    parser.add_argument("--output", default="rl_bench.json", help="file name in benchmarks/results/")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--ours-args", default="", help="extra options for every distlearn run, e.g. '--buffer-size 20000'"
    )
    args = parser.parse_args()
    runs = Path(args.runs)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    algorithms = args.algorithms.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()
    print("warm-up ...", flush=True)
    run_ours("sync-pg", 1, 0, runs / "warmup", 5.0)
    trials = []
    for seed in seeds:  # seeds outermost: a burst of load from other jobs hits every algorithm alike
        if args.reference:
            trial = run_reference(args.reference_python, Path(args.reference_script), seed, args.time_limit)
            trials.append(trial)
            print(json.dumps({k: v for k, v in trial.items() if k != "curve"}), flush=True)
        for algorithm in algorithms:
            for workers in worker_counts:
                out = runs / f"{args.env.replace('/', '-')}-{algorithm}-R{workers}-seed{seed}"
                trial = run_ours(
                    algorithm, workers, seed, out, args.time_limit, args.env, tuple(args.ours_args.split())
                )
                trials.append(trial)
                print(json.dumps({k: v for k, v in trial.items() if k != "curve"}), flush=True)
    rows = []
    groups = [("cleanrl-ppo", 1)] if args.reference else []
    groups += [(a, w) for a in algorithms for w in worker_counts]
    reference = [t["launch_to_solved_s"] for t in trials if t["algorithm"] == "cleanrl-ppo" and t["solved"]]
    reference_median = statistics.median(reference) if reference else None
    header = ["algorithm", "R", "solved", "launch to solved (s)", "train to solved (s)", "env steps to solve",
              "env steps/s", "final return (100)", "vs CleanRL PPO (median time)"]  # fmt: skip
    cells = []
    for algorithm, workers in groups:
        group = [t for t in trials if t["algorithm"] == algorithm and t["workers"] == workers]
        times = [t["launch_to_solved_s"] for t in group]
        solved_times = [t for t in times if t is not None]
        ratio = (
            statistics.median(solved_times) / reference_median if solved_times and reference_median else None
        )
        row = {
            "algorithm": algorithm,
            "workers": workers,
            "solved": f"{sum(t['solved'] for t in group)}/{len(group)}",
            "launch_to_solved_s": _mean_std(times),
            "train_to_solved_s": _mean_std([t["train_to_solved_s"] for t in group]),
            "env_steps_to_solve": _mean_std([t["env_steps_to_solve"] for t in group]),
            "env_steps_per_s": _mean_std([t["env_steps_per_s"] for t in group]),
            "final_return": _mean_std([t["final_return"] for t in group]),
            "time_ratio_vs_reference": None if ratio is None else round(ratio, 2),
        }
        rows.append(row)
        cells.append(
            [algorithm, workers, row["solved"], row["launch_to_solved_s"], row["train_to_solved_s"],
             row["env_steps_to_solve"], row["env_steps_per_s"], row["final_return"],
             "-" if ratio is None else f"{ratio:.2f}x"]
        )  # fmt: skip
    print("\n" + markdown_table(header, cells))
    versions = {"python": platform.python_version()}
    for module in ("torch", "gymnasium", "numpy"):
        versions[module] = __import__(module).__version__
    snapshot = Path("/work/.mirror/vwxyzjn+cleanrl/repo")
    if snapshot.exists():
        versions["cleanrl_commit"] = subprocess.run(
            ["git", "-C", str(snapshot), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "note": "2 cores shared with other jobs while measured",
        },
        "versions": versions,
        "env": args.env,
        "threshold": THRESHOLD if args.env == "CartPole-v1" else None,
        "rows": rows,
        "trials": trials,
    }
    (RESULTS / args.output).write_text(json.dumps(result, indent=1))
    if args.plot:
        _plot(trials, ROOT / "docs" / "img" / "rl-curves.png")
    if args.gif:
        best = min(
            (t for t in trials if t["algorithm"] == "sync-pg" and t["solved"]),
            key=lambda t: t["launch_to_solved_s"],
            default=None,
        )
        if best is not None:
            from distlearn.rl.play import play

            name = f"{args.env.replace('/', '-')}-sync-pg-R{best['workers']}-seed{best['seed']}"
            policy = runs / name / "policy.pt"
            returns = play(policy, episodes=5, gif=ROOT / "docs" / "img" / "rl-cartpole.gif", max_frames=300)
            print(f"GIF from {policy}; greedy returns {returns}")


def _plot(trials: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {
        "cleanrl-ppo": "black",
        "sync-pg": "tab:blue",
        "a3c": "tab:orange",
        "naive": "tab:green",
        "gorila": "tab:red",
    }
    for axis, workers in zip(axes, (1, 2), strict=True):
        labelled = set()
        for trial in trials:
            if trial["workers"] != workers and trial["algorithm"] != "cleanrl-ppo":
                continue
            points = [(t, r) for t, r in trial["curve"] if r is not None]
            if not points:
                continue
            label = trial["algorithm"] if trial["algorithm"] not in labelled else None
            labelled.add(trial["algorithm"])
            axis.plot(
                *zip(*points, strict=True),
                color=colors.get(trial["algorithm"], "grey"),
                alpha=0.8,
                label=label,
                linewidth=1.2,
            )
        axis.axhline(THRESHOLD, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"CartPole-v1, R = {workers} (CleanRL PPO: 1 process)")
        axis.set_xlabel("seconds since the run started")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("mean return of the last 100 episodes")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
