"""A3C and Gorila from 1 to 2 workers on 2 cores: time to solve CartPole-v1, CPU seconds by process role.

Claim checked (issue 24): how A3C and Gorila scale from R = 1 to R = 2 workers on this 2-core machine, and
what limits it. Wall-clock seconds measured while other jobs load the machine say little, so every run also
records what load changes much less: the CPU seconds each process of the job used, by role.

Method: for every algorithm, seed and R, a fresh ``python -m distlearn.rl.cli`` process (``run_ours`` of
benchmarks/rl_bench.py: stops when solved, capped at ``--time-limit``). While it runs, this script reads
``/proc/<pid>/stat`` (user + system CPU of all of a process's threads) of every process descended from it,
every ``--interval`` seconds until the job has exited, and names each process by its role:

* A3C: ``parent`` (the CLI process: gathers returns, decides "solved"), ``actor-learner<i>`` (the spawned
  workers, numbered by start order), ``resource-tracker`` (multiprocessing's helper);
* Gorila: ``launcher`` (the CLI process), ``agent`` (torchrun's), ``server`` (rank 0) and ``bundle<rank>``.

A process's CPU is its last reading, so at most one interval of its CPU before it exits is missed; the job's
exact total is the rise of ``getrusage(RUSAGE_CHILDREN)`` over the run (every process of the job is waited
for by its parent), and ``unattributed_cpu_s`` is the total minus the processes' readings. Per trial:

* ``cpu_total_s`` -- CPU seconds to solve (the run stops when solved; start-up and teardown included);
* each process's ``cpu_s``, ``alive_s`` (first to last reading) and ``utilisation`` = cpu / alive;
* ``busiest_cpu_s`` -- the most CPU one process used: a lower bound on the wall time with a free core per
  process; ``projected_wall_2cores_s`` = max(busiest, total / 2): the lower bound on 2 free cores;
* from the run's own records: env steps and updates to solve, mean staleness over the run, and for Gorila
  the server's busy time (receiving, Adam, replying) and each bundle's time blocked on the server's reply.

    python benchmarks/rl_scaling.py                                    # 3 seeds, A3C then Gorila (1-2 h)
    python benchmarks/rl_scaling.py --algorithms a3c --seeds 1 --output rl_scaling-quick.json

Writes benchmarks/results/<--output> after every trial (a cut-short run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_bench  # noqa: E402  (benchmarks/ is not a package)
from distlearn.tables import markdown_table  # noqa: E402

RESULTS = rl_bench.RESULTS
TICK = os.sysconf("SC_CLK_TCK")
RETURN_LEVELS = (100, 200, 300, 400)  # mean returns (last 100 episodes) whose first env step is recorded
ROLE_SETTLES_S = 10.0  # a process's role is read again at each sample for this long after it appears
START_GRACE_S = 600.0  # on top of rl_bench's own margin: a loaded machine starts and stops a job slowly


def _stat(pid: int) -> tuple[int, float] | None:
    """``(parent pid, user + system CPU seconds)`` of ``pid`` from /proc, None once it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields from the 3rd on; the name may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _role(pid: int, root: int, algorithm: str) -> str:
    if pid == root:
        return "parent" if algorithm.startswith("a3c") else "launcher"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            if "=" in item
        )
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "other"
    if "torch.distributed.run" in command:
        return "agent"
    if "resource_tracker" in command:
        return "resource-tracker"
    if "RANK" in environ and "LOCAL_RANK" in environ:
        rank = int(environ["RANK"])
        if algorithm == "gorila":
            return "server" if rank == 0 else f"bundle{rank}"
        return f"rank{rank}"
    if "spawn_main" in command:
        return "actor-learner"
    return "other"


class ProcessTree:
    """The CPU seconds of ``root`` and every process descended from it, read from /proc when sampled."""

    def __init__(self, root: int, algorithm: str) -> None:
        self.root, self.algorithm = root, algorithm
        self.processes: dict[int, dict] = {}  # pid -> role, cpu_s, first and last reading
        self.foreign: set[int] = set()  # pids seen not to belong to the tree (skipped afterwards)

    def sample(self) -> None:
        now = time.perf_counter()
        for pid in list(self.processes):  # the known ones first: their CPU keeps growing
            self._read(pid, now)
        unknown = {}  # then new descendants: pid -> (parent pid, cpu)
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in self.processes and int(name) not in self.foreign:
                stat = _stat(int(name))
                if stat is not None:
                    unknown[int(name)] = stat
        added = True
        while added:  # a new child may be listed before its new parent
            added = False
            for pid, (parent, cpu) in list(unknown.items()):
                if pid == self.root or parent in self.processes:
                    role = _role(pid, self.root, self.algorithm)
                    self.processes[pid] = {"pid": pid, "role": role, "cpu_s": cpu, "first": now, "last": now}
                    del unknown[pid]
                    added = True
        # the rest hang from a process outside the tree (a pid is not reused within a run)
        self.foreign.update(pid for pid, (parent, _) in unknown.items() if parent not in unknown)

    def _read(self, pid: int, now: float) -> None:
        stat = _stat(pid)
        if stat is not None:
            entry = self.processes[pid]
            entry["cpu_s"], entry["last"] = max(entry["cpu_s"], stat[1]), now
            if now - entry["first"] < ROLE_SETTLES_S:  # a new process shows its parent's command until exec
                role = _role(pid, self.root, self.algorithm)
                if role != "other":  # an exited process (a zombie) has no command line: keep what it was
                    entry["role"] = role

    def report(self) -> list[dict]:
        """Every process seen: role (actor-learners numbered by start order), cpu_s, alive_s, utilisation."""
        rows, learners = [], 0
        for pid in sorted(self.processes, key=lambda p: self.processes[p]["first"]):
            entry = self.processes[pid]
            role = entry["role"]
            if role == "actor-learner":
                role, learners = f"actor-learner{learners}", learners + 1
            alive = entry["last"] - entry["first"]
            rows.append(
                {
                    "role": role,
                    "pid": pid,
                    "cpu_s": round(entry["cpu_s"], 2),
                    "alive_s": round(alive, 2),
                    "utilisation": round(entry["cpu_s"] / alive, 3) if alive > 0 else None,
                }
            )
        return rows


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sampling_runner(algorithm: str, interval: float):
    """A ``runner`` for :func:`rl_bench.run_ours` that samples the job's processes while it runs."""

    def run(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, dict]:
        out = Path(command[command.index("--out") + 1])
        children_before, self_before = _children_cpu(), _self_cpu()
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tree = ProcessTree(process.pid, algorithm)
        stopped = None
        try:
            while process.poll() is None:
                tree.sample()
                now = time.perf_counter()
                if stopped is None and now - start > timeout + START_GRACE_S:
                    process.terminate()  # the run still writes its summary
                    stopped = now
                if stopped is not None and now - stopped > 60:
                    process.kill()
                time.sleep(interval)
        finally:
            if process.poll() is None:
                process.kill()
            stderr = process.communicate()[1].decode(errors="replace")
        wall = time.perf_counter() - start
        total = _children_cpu() - children_before
        return process.returncode, {
            **accounting(tree.report(), total, wall),
            "sampler_cpu_s": round(_self_cpu() - self_before, 2),
            **run_records(out),
            "stderr_tail": stderr[-2000:] if process.returncode else "",
        }

    return run


def accounting(processes: list[dict], total: float, wall: float) -> dict:
    """The trial's CPU figures from its processes' readings and the job's exact total."""
    sampled = sum(p["cpu_s"] for p in processes)
    busiest = max(processes, key=lambda p: p["cpu_s"]) if processes else None
    busiest_cpu = busiest["cpu_s"] if busiest else 0.0
    return {
        "processes": processes,
        "cpu_total_s": round(total, 2),
        "unattributed_cpu_s": round(total - sampled, 2),
        "cpu_utilisation": round(total / wall, 3),  # of the whole job: at most 2 on this machine
        "busiest_role": busiest["role"] if busiest else None,
        "busiest_cpu_s": busiest_cpu,
        "projected_wall_2cores_s": round(max(busiest_cpu, total / 2), 2),
    }


def run_records(out: Path) -> dict:
    """What the run logged itself: mean staleness over its records, Gorila's server and bundle timers."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    staleness = [r["staleness"] for r in records if r["kind"] == "train" and r["staleness"] is not None]
    summary = next((r for r in reversed(records) if r["kind"] == "summary"), records[-1])
    if not staleness and summary.get("staleness") is not None:  # a run shorter than one log interval
        staleness = [summary["staleness"]]
    found: dict = {"staleness_mean": round(statistics.mean(staleness), 3) if staleness else None}
    # learning speed in env steps, also for a run stopped by the cap before it solved
    found["env_steps_to_return"] = {
        str(level): next(
            (
                r["extra"]["env_steps"]
                for r in records
                if r["kind"] == "train" and (r["extra"]["episode_return"] or 0) >= level
            ),
            None,
        )  # fmt: skip
        for level in RETURN_LEVELS
    }
    if "server_busy_s" in summary["extra"]:
        found["server_busy_s"] = summary["extra"]["server_busy_s"]
        found["server_busy_fraction"] = summary["extra"]["server_busy_fraction"]
    bundles = [json.loads(path.read_text()) for path in sorted(out.glob("gorila-bundle*.json"))]
    if bundles:
        found["bundles"] = bundles
        found["bundle_reply_wait_fraction"] = round(
            statistics.mean(b["reply_wait_s"] / max(b["seconds"], 1e-9) for b in bundles), 4
        )
    return found


def _mean_std(values: list, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def _steps_to_solve(files: str) -> dict[tuple[str, int], tuple[float, str]]:
    """(algorithm, R) -> (mean env steps to solve, file) from the rows of earlier result files."""
    found = {}
    for name in filter(None, files.split(",")):
        for row in json.loads((RESULTS / name).read_text())["rows"]:
            text = str(row.get("env_steps_to_solve", ""))
            if text and text[0].isdigit():
                found[(row["algorithm"], row["workers"])] = (float(text.split(" ")[0]), name)
    return found


def _projection(group: list[dict], steps: float, source: str) -> dict:
    """CPU seconds to solve in ``steps`` env steps at each run's CPU per env step (start-up included)."""
    per_step = [t["cpu_total_s"] / t["env_steps"] for t in group if t["env_steps"]]
    busiest = [t["busiest_cpu_s"] / t["env_steps"] for t in group if t["env_steps"]]
    bounds = [max(b * steps, c * steps / 2) for b, c in zip(busiest, per_step, strict=True)]
    return {
        "env_steps_to_solve": steps,
        "from": source,
        "cpu_to_solve_s": _mean_std([c * steps for c in per_step]),
        "busiest_cpu_to_solve_s": _mean_std([b * steps for b in busiest]),
        "wall_bound_2cores_s": _mean_std(bounds),
    }


def summarise(trials: list[dict], steps_to_solve_from: str = "") -> list[dict]:
    """One row per (algorithm, R): mean ± std over seeds (solved runs only for the to-solve figures)."""
    reference = _steps_to_solve(steps_to_solve_from)
    rows = []
    for algorithm in dict.fromkeys(t["algorithm"] for t in trials):
        for workers in sorted({t["workers"] for t in trials if t["algorithm"] == algorithm}):
            group = [t for t in trials if t["algorithm"] == algorithm and t["workers"] == workers]
            solved = [t for t in group if t["solved"]]
            roles: dict[str, list[dict]] = {}
            for trial in group:
                for process in trial["processes"]:
                    roles.setdefault(process["role"], []).append(process)
            row = {  # the to-solve figures over the solved runs; rates and shares over every run
                "algorithm": algorithm,
                "workers": workers,
                "solved": f"{len(solved)}/{len(group)}",
                "seeds": [t["seed"] for t in group],
                "launch_to_solved_s": _mean_std([t["launch_to_solved_s"] for t in solved]),
                "train_to_solved_s": _mean_std([t["train_to_solved_s"] for t in solved]),
                "env_steps_to_solve": _mean_std([t["env_steps_to_solve"] for t in solved], 0),
                "cpu_to_solve_s": _mean_std([t["cpu_total_s"] for t in solved]),
                "busiest_cpu_to_solve_s": _mean_std([t["busiest_cpu_s"] for t in solved]),
                "projected_wall_2cores_s": _mean_std([t["projected_wall_2cores_s"] for t in solved]),
                "wall_s": _mean_std([t["wall_s"] for t in group]),
                "env_steps": _mean_std([t["env_steps"] for t in group], 0),
                "updates": _mean_std([t["updates"] for t in group], 0),
                "staleness": _mean_std([t["staleness_mean"] for t in group], 2),
                "cpu_total_s": _mean_std([t["cpu_total_s"] for t in group]),
                "cpu_us_per_env_step": _mean_std(
                    [1e6 * t["cpu_total_s"] / t["env_steps"] for t in group if t["env_steps"]], 0
                ),
                "job_cpu_utilisation": _mean_std([t["cpu_utilisation"] for t in group], 2),
                "busiest_share_of_cpu": _mean_std(
                    [t["busiest_cpu_s"] / t["cpu_total_s"] for t in group if t["cpu_total_s"]], 2
                ),
                "roles": {
                    role: {
                        "cpu_s": _mean_std([p["cpu_s"] for p in found]),
                        "utilisation": _mean_std([p["utilisation"] for p in found], 2),
                    }
                    for role, found in roles.items()
                },
            }
            row["env_steps_to_return"] = {
                level: _mean_std([t.get("env_steps_to_return", {}).get(level) for t in group], 0)
                for level in map(str, RETURN_LEVELS)
            }
            if (algorithm, workers) in reference:
                row["projected"] = _projection(group, *reference[(algorithm, workers)])
            if any("server_busy_fraction" in t for t in group):
                row["server_busy_fraction"] = _mean_std([t.get("server_busy_fraction") for t in group], 2)
                row["bundle_reply_wait_fraction"] = _mean_std(
                    [t.get("bundle_reply_wait_fraction") for t in group], 2
                )
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    header = ["algorithm", "R", "solved", "launch to solved (s)", "env steps to solve", "CPU s to solve",
              "bound on 2 free cores (s)", "wall (s)", "env steps", "updates", "staleness", "CPU s",
              "CPU µs / env step", "busiest process's share"]  # fmt: skip
    cells = [
        [r["algorithm"], r["workers"], r["solved"], r["launch_to_solved_s"], r["env_steps_to_solve"],
         r["cpu_to_solve_s"], r["projected_wall_2cores_s"], r["wall_s"], r["env_steps"], r["updates"],
         r["staleness"], r["cpu_total_s"], r["cpu_us_per_env_step"], r["busiest_share_of_cpu"]]
        for r in rows
    ]  # fmt: skip
    return markdown_table(header, cells)


def role_table(rows: list[dict]) -> str:
    """Each role's CPU seconds and utilisation (cpu / its lifetime), mean ± std over the runs."""
    header = ["algorithm", "R", "role", "CPU s", "utilisation", "share of the job's CPU"]
    cells = []
    for row in rows:
        total = float(row["cpu_total_s"].split(" ")[0])
        for role, figures in row["roles"].items():
            mean = float(figures["cpu_s"].split(" ")[0])
            cells.append([row["algorithm"], row["workers"], role, figures["cpu_s"], figures["utilisation"],
                          f"{mean / total:.2f}"])  # fmt: skip
    return markdown_table(header, cells)


def projection_table(rows: list[dict]) -> str:
    """What the CPU per env step measured here makes of the env steps to solve of the earlier files."""
    header = ["algorithm", "R", "env steps to solve (earlier file)", "CPU s to solve",
              "busiest process's CPU s", "bound on 2 free cores (s)", "file"]  # fmt: skip
    cells = [
        [r["algorithm"], r["workers"], f"{r['projected']['env_steps_to_solve']:.0f}",
         r["projected"]["cpu_to_solve_s"], r["projected"]["busiest_cpu_to_solve_s"],
         r["projected"]["wall_bound_2cores_s"], r["projected"]["from"]]
        for r in rows
        if "projected" in r
    ]  # fmt: skip
    return markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="a3c,gorila")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=600.0, help="cap per run (seconds)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between /proc readings")
    parser.add_argument("--runs", default="/tmp/rl-scaling-runs", help="where the runs' directories go")
    parser.add_argument("--output", default="rl_scaling.json", help="file name in benchmarks/results/")
    parser.add_argument("--ours-args", default="", help="extra options for every run")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--resummarise", action="store_true", help="redo --output's rows")
    parser.add_argument("--merge", default="", help="--resummarise: add these files' trials")
    parser.add_argument(
        "--steps-to-solve-from", default="", help="result files (comma-separated) whose rows' env steps to "
        "solve project this run's CPU per env step to CPU seconds to solve",
    )  # fmt: skip
    args = parser.parse_args()
    if args.resummarise:
        path = RESULTS / args.output
        result = json.loads(path.read_text())
        for name in filter(None, args.merge.split(",")):  # the trials of other files of the same benchmark
            part = json.loads(Path(name).read_text())
            result["trials"] += part["trials"]
            result.setdefault("merged", []).append(
                {"file": Path(name).name, "command": part["command"], "started": part.get("started"),
                 "machine": part["machine"], "trials": [(t["workers"], t["seed"]) for t in part["trials"]]}
            )  # fmt: skip
        for trial in result["trials"]:  # the runs' own records again, where their directories are still there
            out = Path(args.runs) / f"{trial['algorithm']}-R{trial['workers']}-seed{trial['seed']}"
            if (out / "metrics.jsonl").exists():
                trial.update(run_records(out))
        result["rows"] = summarise(result["trials"], args.steps_to_solve_from)
        path.write_text(json.dumps(result, indent=1))
        print(table(result["rows"]), role_table(result["rows"]), projection_table(result["rows"]), sep="\n\n")
        return
    runs = Path(args.runs)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    algorithms = args.algorithms.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()
    if not args.no_warmup:
        rl_bench.run_ours("sync-pg", 1, 0, runs / "warmup", 5.0)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    trials: list[dict] = []
    for algorithm in algorithms:  # A3C first: Gorila's runs are the long ones
        for seed in seeds:
            for r in workers:  # R innermost: a burst of load hits both worker counts alike
                out = runs / f"{algorithm}-R{r}-seed{seed}"
                trial = rl_bench.run_ours(
                    algorithm, r, seed, out, args.time_limit, extra=tuple(args.ours_args.split()),
                    runner=sampling_runner(algorithm, args.interval),
                )  # fmt: skip
                trial["load_at_end"] = os.getloadavg()
                trials.append(trial)
                shown = {k: v for k, v in trial.items() if k not in ("curve", "processes")}
                print(json.dumps(shown), flush=True)
                write(args, trials, load_before, started)
    print("\n" + table(summarise(trials, args.steps_to_solve_from)))


def write(args: argparse.Namespace, trials: list[dict], load_before: tuple, started: str) -> None:
    versions = {"python": platform.python_version()}
    for module in ("torch", "gymnasium", "numpy"):
        versions[module] = __import__(module).__version__
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "started": started,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "note": "2 cores shared with other jobs (load far above 2) while measured: wall times inflated",
        },
        "versions": versions,
        "env": "CartPole-v1",
        "threshold": rl_bench.THRESHOLD,
        "rows": summarise(trials, args.steps_to_solve_from),
        "trials": trials,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
