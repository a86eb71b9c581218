"""Allreduce bus bandwidth of each distlearn reducer against gloo's own ``dist.all_reduce`` and MPI's
``MPI_Allreduce``, with a one-core memory copy for context, in one run.

Claims: issue 5, with R = 2 workers on this machine, the ring, segmented ring and Rabenseifner reducers
(c10d point-to-point) reach at least 1.0x the bus bandwidth of gloo's allreduce at 1 MB and above; issue 23,
the goals of the shared-memory reducer ``shm`` (checked when ``shm`` is in ``REDUCERS``): busbw >= 3x gloo's
and >= MPI's at every size >= 1 MB, >= 40% of the memory-copy bandwidth at 64 MB, a 4 KB allreduce in
<= 20 us (:func:`goal_ratios`; printed with pass or fail, saved under ``goals``).

Method (the nccl-tests definitions): a float32 tensor of ``size`` bytes; ``algbw = size / time``;
``busbw = algbw * 2 (R-1) / R`` (the bytes each rank must move in any bandwidth-optimal allreduce, so
that busbw is comparable across R and with a link's speed). One trial = ``iters`` back-to-back calls
after a barrier (``iters`` = 16 MB / size, between 1 and 50); a trial's time is the slowest rank's;
warm-up trials first, then the timed trials, algorithms interleaved within each round (in alternating
order) so that load from other processes hits all of them alike; we report the median time, the spread
(min..max busbw) and the ratio of medians to gloo (``backend``).

The trials run in ``--blocks`` blocks (3 by default), each one torchrun job per reducer (``--jobs
per-algorithm``, the default, in an order rotated by one each block; ``--jobs shared`` times them all in
one job, as before 2026-12-07: there the p2p reducers' extra gloo groups slowed the shm reducer's 4 KB
calls about 4x, which a training job, holding one reducer, does not see), then an
mpiexec job of MPI's allreduce (``benchmarks/mpi_allreduce.py``: the same sizes and trial definition, on
127.0.0.1, bounded by ``--mpi-timeout``), then the memory copy, so that load from other processes hits
all three alike. MPI is MPICH's through mpi4py, a benchmark-only extra: ``pip install -e '.[mpi]'``;
without it the table says "MPI: not installed" and goes on. The memory copy: ``copy_`` of a float32
tensor of each size on one thread, ``iters`` copies per trial, bandwidth = size / time. The 4 KB latency
of each algorithm (median seconds per call) is printed in microseconds. Runs in a few minutes with
R = 2.

    python benchmarks/allreduce_busbw.py [--world-size 2] [--trials 15] [--blocks 3] [--out FILE.json]
    python benchmarks/allreduce_busbw.py --trials 2 --sizes 4096 1048576    # a check that it works

This process starts the torchrun jobs (``distlearn.launch.launch_local``) and the mpiexec jobs on
127.0.0.1, gathers their raw times, prints the table and writes the raw numbers, with the command,
machine and versions, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distlearn.comm.reducers import REDUCERS, create_reducer  # noqa: E402
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown  # noqa: E402
from distlearn.tables import markdown_table  # noqa: E402
from mpi_allreduce import iterations  # noqa: E402  (the one trial definition, shared with the MPI job)

SIZES = [4 << 10 << (2 * i) for i in range(8)]  # 4 KB, 16 KB, ..., 64 MB
ENV_COMMAND = "DISTLEARN_BENCH_COMMAND"
MPI_SCRIPT = Path(__file__).resolve().parent / "mpi_allreduce.py"
INSTALL_MPI = "pip install -e '.[mpi]'"
GOAL_SIZE = 64 << 20  # the memory-copy goal's size
LATENCY_SIZE = 4 << 10
# issue 23's goals for the shared-memory reducer: (what, comparison, target)
GOALS = {
    "shm / gloo busbw": (">=", 3.0),
    "shm / MPI busbw": (">=", 1.0),
    "shm busbw / memcpy bandwidth": (">=", 0.4),
    "shm 4 KB latency (us)": ("<=", 20.0),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2, help="workers R (default 2)")
    parser.add_argument("--trials", type=int, default=15, help="timed trials per size and algorithm, in all")
    parser.add_argument("--blocks", type=int, default=3, help="blocks the trials are split into (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed trials at the start of each block")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="message sizes in bytes")
    parser.add_argument("--algorithms", nargs="+", default=list(REDUCERS), choices=list(REDUCERS))
    parser.add_argument("--segment-bytes", type=int, default=4 << 20, help="segmented ring's segment size")
    parser.add_argument(
        "--tree-segment-bytes", type=int, default=4 << 20, help="the tree's segment size (0: unsegmented)"
    )
    parser.add_argument(
        "--jobs",
        choices=["per-algorithm", "shared"],
        default="per-algorithm",
        help="one torchrun job per algorithm and block (default: a reducer is timed in a process that holds "
        "no other reducer's groups, as in training), or all algorithms interleaved in one job",
    )
    parser.add_argument("--out", default="benchmarks/results/allreduce_busbw.json")
    parser.add_argument("--timeout", type=float, default=300, help="deadline of each torchrun block (s)")
    parser.add_argument("--mpi-timeout", type=float, default=120, help="deadline of each MPI block (s)")
    parser.add_argument(
        "--mpi-python", default=sys.executable, help="the interpreter of the MPI ranks (default: this one)"
    )
    parser.add_argument("--block-out", help=argparse.SUPPRESS)  # where a torchrun block writes its times
    args = parser.parse_args(argv)
    if args.trials < 1 or args.blocks < 1 or args.warmup < 0:
        parser.error("--trials and --blocks must be at least 1 and --warmup at least 0")
    if any(size < 4 or size % 4 for size in args.sizes):
        parser.error("--sizes must be positive multiples of 4 bytes (float32 elements)")
    return args


def split_trials(trials: int, blocks: int) -> list[int]:
    """``trials`` spread over at most ``blocks`` blocks, as evenly as whole trials allow."""
    blocks = min(blocks, trials)
    return [trials // blocks + (b < trials % blocks) for b in range(blocks)]


# -- the torchrun block --------------------------------------------------------------------------------


def timed_trial(reducer, tensor: torch.Tensor, iters: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        reducer.allreduce_(tensor)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a trial lasts as long as its slowest rank
    return float(elapsed.item())


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun block: every reducer at every size; rank 0 writes the times."""
    context = init_distributed(timeout_s=120)
    options = {
        "segmented-ring": {"segment_bytes": args.segment_bytes},
        "tree": {"segment_bytes": args.tree_segment_bytes or None},
    }
    reducers = {name: create_reducer(name, **options.get(name, {})) for name in args.algorithms}
    seconds: dict[str, dict[str, list[float]]] = {name: {} for name in reducers}
    try:
        for nbytes in args.sizes:
            tensor = torch.ones(nbytes // 4)
            iters = iterations(nbytes)
            for name in reducers:
                seconds[name][str(nbytes)] = []
            for trial in range(args.warmup + args.trials):
                order = list(reducers.items())
                for name, reducer in order if trial % 2 else reversed(order):  # alternate who goes first
                    elapsed = timed_trial(reducer, tensor, iters)
                    if trial >= args.warmup:
                        seconds[name][str(nbytes)].append(elapsed)
        if context.rank == 0:
            record = {"world_size": context.world_size, "threads": torch.get_num_threads()}
            Path(args.block_out).write_text(json.dumps({**record, "seconds": seconds}) + "\n")
    finally:
        shutdown()


# -- the MPI block and the memory copy ------------------------------------------------------------------


def mpi_command(python: str, world: int) -> tuple[list[str] | None, str]:
    """The mpiexec command line of an MPI block, or None and why not (``MPI: ...`` in the table)."""
    try:
        probe = subprocess.run(
            [python, "-c", "import mpi4py.MPI"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"not available ({python} did not run: {error})"
    if probe.returncode != 0:
        if "No module named 'mpi4py'" in probe.stderr:
            return None, f"not installed ({INSTALL_MPI})"
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"mpi4py does not load ({last}; {INSTALL_MPI} brings MPICH's library)"
    beside = Path(python).parent / "mpiexec"  # the mpich wheel puts it in the environment's bin/
    mpiexec = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if mpiexec is None:
        return None, f"no mpiexec next to {python} or on PATH ({INSTALL_MPI}: the mpich wheel ships one)"
    # MPICH's hydra: ranks forked on this host, 127.0.0.1 only
    return [mpiexec, "-launcher", "fork", "-hosts", "127.0.0.1", "-n", str(world), python], "measured"


def run_mpi_block(command: list[str], args: argparse.Namespace, trials: int, out: Path) -> dict | str:
    """One MPI block's times (``mpi_allreduce.py``'s record), or why there are none."""
    arguments = [str(MPI_SCRIPT), "--sizes", *map(str, args.sizes), "--trials", str(trials)]
    arguments += ["--warmup", str(args.warmup), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # mpiexec and its ranks in one group, stopped together on the deadline
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=args.mpi_timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        return f"failed (an MPI block ran past --mpi-timeout {args.mpi_timeout:g} s)"
    if process.returncode != 0 or not out.is_file():
        last = (output.strip().splitlines() or ["no output"])[-1]
        return f"failed (mpiexec exited with {process.returncode}: {last})"
    return json.loads(out.read_text())


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def memcpy_seconds(nbytes: int, trials: int) -> list[float]:
    """Seconds per ``copy_`` of ``nbytes`` of float32 on one thread, one number per trial."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = torch.ones(nbytes // 4)
        target = torch.empty_like(source)
        target.copy_(source)
        iters = iterations(nbytes)
        samples = []
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(iters):
                target.copy_(source)
            samples.append((time.perf_counter() - start) / iters)
        return samples
    finally:
        torch.set_num_threads(threads)


# -- results ---------------------------------------------------------------------------------------------


def result_row(name: str, nbytes: int, samples: list[float], world: int) -> dict:
    bus = 2 * (world - 1) / world
    median = statistics.median(samples)
    return {
        "algorithm": name,
        "bytes": nbytes,
        "iters": iterations(nbytes),
        "seconds": samples,
        "median_s": median,
        "algbw_GBps": nbytes / median / 1e9,
        "busbw_GBps": nbytes / median * bus / 1e9,
        "busbw_min_GBps": nbytes / max(samples) * bus / 1e9,
        "busbw_max_GBps": nbytes / min(samples) * bus / 1e9,
    }


def goal_ratios(rows: list[dict], memcpy: dict[int, float]) -> list[dict]:
    """Issue 23's goals for the ``shm`` reducer, from result rows (``algorithm``, ``bytes``, ``median_s``,
    ``busbw_GBps``; MPI's rows named ``mpi``, gloo's ``backend``) and the memory copy's bandwidth in GB/s
    per size. One dict per goal and size: ``goal``, ``bytes``, ``value``, ``comparison``, ``target``,
    ``passed``. Empty without an ``shm`` row; a goal whose other side was not measured is left out."""
    table = {(row["algorithm"], row["bytes"]): row for row in rows}
    sizes = sorted({nbytes for name, nbytes in table if name == "shm"})
    goals = []

    def add(goal: str, nbytes: int, value: float) -> None:
        comparison, target = GOALS[goal]
        passed = value >= target if comparison == ">=" else value <= target
        goals.append(
            {"goal": goal, "bytes": nbytes, "value": value, "comparison": comparison, "target": target,
             "passed": passed}
        )  # fmt: skip

    for nbytes in sizes:
        shm = table[("shm", nbytes)]
        if nbytes >= 1 << 20:
            for peer, goal in (("backend", "shm / gloo busbw"), ("mpi", "shm / MPI busbw")):
                if (peer, nbytes) in table:
                    add(goal, nbytes, shm["busbw_GBps"] / table[(peer, nbytes)]["busbw_GBps"])
        if nbytes == GOAL_SIZE and memcpy.get(nbytes):
            add("shm busbw / memcpy bandwidth", nbytes, shm["busbw_GBps"] / memcpy[nbytes])
        if nbytes == LATENCY_SIZE:
            add("shm 4 KB latency (us)", nbytes, shm["median_s"] * 1e6)
    return goals


def latencies_us(rows: list[dict], memcpy_rows: list[dict]) -> dict[str, float]:
    """Median microseconds per call at 4 KB, per algorithm (and per copy)."""
    found = {row["algorithm"]: row["median_s"] * 1e6 for row in rows if row["bytes"] == LATENCY_SIZE}
    for row in memcpy_rows:
        if row["bytes"] == LATENCY_SIZE:
            found["memcpy"] = row["median_s"] * 1e6
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if in_torchrun():
        worker(args)
        return 0
    arguments = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    env[ENV_COMMAND] = os.environ.get(ENV_COMMAND, " ".join(["python", *sys.argv]))
    command, mpi_status = mpi_command(args.mpi_python, args.world_size)
    if command is None:
        print(f"MPI: {mpi_status}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    torch_seconds: dict[str, dict[int, list[float]]] = {}
    mpi_seconds: dict[int, list[float]] = {}
    copy_seconds: dict[int, list[float]] = {nbytes: [] for nbytes in args.sizes}
    world, threads, library = args.world_size, None, None
    with tempfile.TemporaryDirectory(prefix="allreduce-busbw-") as tmp:
        blocks = split_trials(args.trials, args.blocks)
        for block, trials in enumerate(blocks):
            print(f"block {block + 1}/{len(blocks)}: {trials} trial(s)", flush=True)
            if args.jobs == "shared":
                groups = [list(args.algorithms)]
            else:  # one job per algorithm, in an order rotated by one each block
                shift = block % len(args.algorithms)
                groups = [[name] for name in args.algorithms[shift:] + args.algorithms[:shift]]
            for index, names in enumerate(groups):
                out = Path(tmp) / f"torch-{block}-{index}.json"
                code = launch_local(
                    [__file__, *arguments, "--trials", str(trials), "--block-out", str(out),
                     "--algorithms", *names], args.world_size, module=False, timeout_s=args.timeout, env=env,
                )  # fmt: skip
                if code != 0:
                    return code
                record = json.loads(out.read_text())
                world, threads = record["world_size"], record["threads"]
                for name, per_size in record["seconds"].items():
                    for nbytes, samples in per_size.items():
                        torch_seconds.setdefault(name, {}).setdefault(int(nbytes), []).extend(samples)
            if command is not None:
                result = run_mpi_block(command, args, trials, Path(tmp) / f"mpi-{block}.json")
                if isinstance(result, str):
                    command, mpi_status = None, result
                    print(f"MPI: {mpi_status}", flush=True)
                else:
                    library = result["library"]
                    for nbytes, samples in result["seconds"].items():
                        mpi_seconds.setdefault(int(nbytes), []).extend(samples)
            for nbytes in args.sizes:
                copy_seconds[nbytes] += memcpy_seconds(nbytes, trials)
    rows = [
        result_row(name, nbytes, samples, world)
        for name, per_size in torch_seconds.items()
        for nbytes, samples in per_size.items()
    ]
    mpi_rows = [] if command is None else [result_row("mpi", n, s, world) for n, s in mpi_seconds.items()]
    memcpy_rows = [
        {"bytes": n, "seconds": s, "median_s": statistics.median(s), "GBps": n / statistics.median(s) / 1e9}
        for n, s in copy_seconds.items()
    ]
    backend = {row["bytes"]: row["median_s"] for row in rows if row["algorithm"] == "backend"}
    for row in rows + mpi_rows:
        row["ratio_vs_backend"] = backend[row["bytes"]] / row["median_s"] if row["bytes"] in backend else None
    memcpy = {row["bytes"]: row["GBps"] for row in memcpy_rows}
    record = {
        "benchmark": "allreduce_busbw",
        "command": env[ENV_COMMAND],
        "world_size": world,
        "trials": args.trials,
        "blocks": len(split_trials(args.trials, args.blocks)),
        "jobs": args.jobs,
        "warmup": args.warmup,
        "segment_bytes": args.segment_bytes,
        "tree_segment_bytes": args.tree_segment_bytes or None,
        "definition": "algbw = bytes / time; busbw = algbw * 2(R-1)/R (nccl-tests); time = slowest rank",
        "memcpy_GBps": memcpy[max(args.sizes)],
        "memcpy": memcpy_rows,
        "mpi": {"status": "measured" if command else mpi_status, "library": library, "results": mpi_rows},
        "latency_4KB_us": latencies_us(rows + mpi_rows, memcpy_rows),
        "goals": goal_ratios(rows + mpi_rows, memcpy),
        "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "2-core machine shared with other processes while measuring; see the load averages",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads_per_worker": threads,
        },
        "versions": {"torch": str(torch.__version__), "python": platform.python_version(), "mpi": library},
        "results": rows,
    }
    print(report(record, args.sizes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}\n")
    print(markdown(record))
    return 0


def report(record: dict, sizes: list[int]) -> str:
    """The console table: busbw GB/s (ratio to gloo's) per algorithm, MPI and the memory copy; the 4 KB
    latencies; the goals."""
    rows = record["results"] + record["mpi"]["results"]
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    memcpy = {row["bytes"]: row["GBps"] for row in record["memcpy"]}
    lines = [
        f"allreduce busbw (GB/s), R = {record['world_size']}, median of {record['trials']} trials in "
        f"{record['blocks']} block(s); ratio = busbw / gloo's; memcpy = one-core copy bandwidth",
        f"{'size':>8} " + " ".join(f"{name:>22}" for name in names) + f" {'memcpy':>10}",
    ]
    for nbytes in sizes:
        cells = []
        for name in names:
            row = next((r for r in rows if r["algorithm"] == name and r["bytes"] == nbytes), None)
            if row is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = f" ({row['ratio_vs_backend']:.2f}x)" if row["ratio_vs_backend"] is not None else ""
            cells.append(f"{row['busbw_GBps']:>13.3f}{ratio:>9}")
        lines.append(f"{human(nbytes):>8} " + " ".join(cells) + f" {memcpy[nbytes]:>10.2f}")
    if record["mpi"]["status"] != "measured":
        lines.append(f"MPI: {record['mpi']['status']}")
    else:
        lines.append(f"MPI: {record['mpi']['library']}")
    if record["latency_4KB_us"]:
        latency = ", ".join(f"{name} {us:.1f}" for name, us in record["latency_4KB_us"].items())
        lines.append(f"4 KB latency (us per call, median): {latency}")
    lines.append(f"load average {record['load_average_after'][0]:.2f}")
    if record["goals"]:
        lines.append("issue 23 goals:")
        for goal in record["goals"]:
            verdict = "pass" if goal["passed"] else "FAIL"
            lines.append(
                f"  {goal['goal']} at {human(goal['bytes'])}: {goal['value']:.2f} "
                f"(goal {goal['comparison']} {goal['target']:g}) {verdict}"
            )
    else:
        lines.append("issue 23 goals: no 'shm' reducer in this run (not in REDUCERS or --algorithms)")
    return "\n".join(lines)


def markdown(record: dict) -> str:
    """The results as a Markdown table (for docs/sync-reducers.md): busbw GB/s (ratio to gloo), with MPI's
    and the memory copy's columns where they were measured."""
    rows = record["results"] + record.get("mpi", {}).get("results", [])
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    memcpy = {row["bytes"]: row["GBps"] for row in record.get("memcpy", [])}
    lines = []
    for nbytes in sorted({row["bytes"] for row in rows}):
        cells = []
        for name in names:
            row = next((r for r in rows if r["algorithm"] == name and r["bytes"] == nbytes), None)
            ratio = None if row is None else row.get("ratio_vs_backend")
            if row is None:
                cells.append("-")
            elif ratio is not None and name != "backend":
                cells.append(f"{row['busbw_GBps']:.3f} ({ratio:.2f}x)")
            else:
                cells.append(f"{row['busbw_GBps']:.3f}")
        extra = [f"{memcpy[nbytes]:.2f}"] if memcpy else []
        lines.append([human(nbytes), *cells, *extra])
    return markdown_table(["size", *names, *(["memcpy"] if memcpy else [])], lines)


def human(nbytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


if __name__ == "__main__":
    sys.exit(main())
