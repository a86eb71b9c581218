"""Allreduce bus bandwidth of each distlearn reducer against gloo's own ``dist.all_reduce``, in one run.

Claim (issue 5): with R = 2 workers on this machine, the ring, segmented ring and Rabenseifner reducers
(c10d point-to-point) reach at least 1.0x the bus bandwidth of gloo's allreduce at 1 MB and above.

Method (the nccl-tests definitions): a float32 tensor of ``size`` bytes; ``algbw = size / time``;
``busbw = algbw * 2 (R-1) / R`` (the bytes each rank must move in any bandwidth-optimal allreduce, so
that busbw is comparable across R and with a link's speed). One trial = ``iters`` back-to-back calls
after a barrier (``iters`` = 16 MB / size, between 1 and 50); a trial's time is the slowest rank's;
warm-up trials first, then ``--trials`` trials, algorithms interleaved within each round (in alternating
order) so that load from other processes hits all of them alike; we report
the median time, the spread (min..max busbw) and the ratio of medians to gloo (``backend``). A memory
copy of the largest size is timed for context. Runs in about 1-2 minutes with R = 2.

    python benchmarks/allreduce_busbw.py [--world-size 2] [--trials 7] [--out FILE.json]

The script starts its own torchrun job (``distlearn.launch.launch_local``) on 127.0.0.1; rank 0 prints
the table and writes the raw numbers, with the command, machine and versions, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distlearn.comm.reducers import REDUCERS, create_reducer
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown
from distlearn.tables import markdown_table

SIZES = [4 << 10 << (2 * i) for i in range(8)]  # 4 KB, 16 KB, ..., 64 MB
ENV_COMMAND = "DISTLEARN_BENCH_COMMAND"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2, help="workers R (default 2)")
    parser.add_argument("--trials", type=int, default=15, help="timed trials per size and algorithm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed trials first")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="message sizes in bytes")
    parser.add_argument("--algorithms", nargs="+", default=list(REDUCERS), choices=list(REDUCERS))
    parser.add_argument("--segment-bytes", type=int, default=4 << 20, help="segmented ring's segment size")
    parser.add_argument(
        "--tree-segment-bytes", type=int, default=4 << 20, help="the tree's segment size (0: unsegmented)"
    )
    parser.add_argument("--out", default="benchmarks/results/allreduce_busbw.json")
    parser.add_argument("--timeout", type=float, default=300, help="deadline of the whole job (s)")
    return parser.parse_args(argv)


def iterations(nbytes: int) -> int:
    """Calls per trial: enough that a trial of small messages lasts well above the timer's resolution."""
    return max(1, min(50, (16 << 20) // nbytes))


def timed_trial(reducer, tensor: torch.Tensor, iters: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        reducer.allreduce_(tensor)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a trial lasts as long as its slowest rank
    return float(elapsed.item())


def memcpy_bandwidth(nbytes: int, trials: int = 5) -> float:
    source = torch.ones(nbytes // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    context = init_distributed(timeout_s=120)
    rank, world = context.rank, context.world_size
    options = {
        "segmented-ring": {"segment_bytes": args.segment_bytes},
        "tree": {"segment_bytes": args.tree_segment_bytes or None},
    }
    reducers = {name: create_reducer(name, **options.get(name, {})) for name in args.algorithms}
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for nbytes in args.sizes:
        tensor = torch.ones(nbytes // 4)
        iters = iterations(nbytes)
        times: dict[str, list[float]] = {name: [] for name in reducers}
        for trial in range(args.warmup + args.trials):
            order = list(reducers.items())
            for name, reducer in order if trial % 2 else reversed(order):  # alternate who goes first
                seconds = timed_trial(reducer, tensor, iters)
                if trial >= args.warmup:
                    times[name].append(seconds)
        bus = 2 * (world - 1) / world
        for name, samples in times.items():
            median = statistics.median(samples)
            rows.append(
                {
                    "algorithm": name,
                    "bytes": nbytes,
                    "iters": iters,
                    "seconds": samples,
                    "median_s": median,
                    "algbw_GBps": nbytes / median / 1e9,
                    "busbw_GBps": nbytes / median * bus / 1e9,
                    "busbw_min_GBps": nbytes / max(samples) * bus / 1e9,
                    "busbw_max_GBps": nbytes / min(samples) * bus / 1e9,
                }
            )
    copy = memcpy_bandwidth(max(args.sizes)) if rank == 0 else 0.0
    if rank == 0:
        report(args, world, rows, copy, load_before, time.perf_counter() - started)
    shutdown()


def report(args, world, rows, copy, load_before, seconds) -> None:
    backend = {row["bytes"]: row["median_s"] for row in rows if row["algorithm"] == "backend"}
    for row in rows:
        row["ratio_vs_backend"] = backend[row["bytes"]] / row["median_s"] if row["bytes"] in backend else None
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    print(f"allreduce busbw (GB/s), R = {world}, median of {args.trials} trials; ratio = busbw / gloo's")
    print(f"{'size':>8} " + " ".join(f"{name:>22}" for name in names))
    for nbytes in args.sizes:
        cells = []
        for name in names:
            row = next(r for r in rows if r["algorithm"] == name and r["bytes"] == nbytes)
            ratio = f" ({row['ratio_vs_backend']:.2f}x)" if row["ratio_vs_backend"] is not None else ""
            cells.append(f"{row['busbw_GBps']:>13.3f}{ratio:>9}")
        print(f"{human(nbytes):>8} " + " ".join(cells))
    print(
        f"memory copy of {human(max(args.sizes))}: {copy / 1e9:.2f} GB/s; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    record = {
        "benchmark": "allreduce_busbw",
        "command": os.environ.get(ENV_COMMAND, " ".join(sys.argv)),
        "world_size": world,
        "trials": args.trials,
        "warmup": args.warmup,
        "segment_bytes": args.segment_bytes,
        "tree_segment_bytes": args.tree_segment_bytes or None,
        "definition": "algbw = bytes / time; busbw = algbw * 2(R-1)/R (nccl-tests); time = slowest rank",
        "memcpy_GBps": copy / 1e9,
        "wall_seconds": seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "2-core machine shared with other processes while measuring; see the load averages",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads_per_worker": torch.get_num_threads(),
        },
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}\n")
    print(markdown(record))


def markdown(record: dict) -> str:
    """The results as a Markdown table (for docs/sync.md): busbw GB/s (ratio to gloo) [min..max]."""
    rows = record["results"]
    names = list(dict.fromkeys(row["algorithm"] for row in rows))
    lines = []
    for nbytes in sorted({row["bytes"] for row in rows}):
        cells = []
        for name in names:
            row = next(r for r in rows if r["algorithm"] == name and r["bytes"] == nbytes)
            ratio = row.get("ratio_vs_backend")
            cells.append(
                f"{row['busbw_GBps']:.3f} ({ratio:.2f}x)"
                if ratio is not None and name != "backend"
                else f"{row['busbw_GBps']:.3f}"
            )
        lines.append([human(nbytes), *cells])
    return markdown_table(["size", *names], lines)


def human(nbytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if in_torchrun():
        worker(args)
        return 0
    env = dict(os.environ)
    env[ENV_COMMAND] = " ".join(["python", *sys.argv])
    arguments = sys.argv[1:] if argv is None else argv
    return launch_local(
        [__file__, *arguments], args.world_size, module=False, timeout_s=args.timeout, env=env
    )


if __name__ == "__main__":
    sys.exit(main())
