"""The shm reducer's two paths against gloo, in one run: a private tensor (staged through the slots) and a
tensor from ``shared_buffer`` (zero copy), plus the latency distribution of a 4 KB allreduce.

    python benchmarks/shm_paths.py [--world-size 2] [--trials 5] [--out benchmarks/results/shm_paths.json]

Starts its own torchrun job on 127.0.0.1 (one torch thread per worker, as allreduce_busbw.py). For each size
and trial: ``iters`` back-to-back calls (32 MB / size, 2..200) after a barrier, methods interleaved; the
median time over trials gives busbw = size / time * 2 (R-1) / R. Latency: 2000 single 4 KB calls each,
timed on rank 0 (min, 10th, 50th, 90th percentile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from distlearn.comm.reducers import create_reducer
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 1 << 20, 64 << 20])
    parser.add_argument("--out", default="benchmarks/results/shm_paths.json")
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=120)
    rank, world = context.rank, context.world_size
    gloo, shm = create_reducer("backend"), create_reducer("shm")
    rows = []
    for size in args.sizes:
        n = size // 4
        private, shared = torch.ones(n), shm.shared_buffer(n)
        shared.fill_(1.0)
        methods = {
            "gloo": lambda x=private: gloo.allreduce_(x),
            "shm staged": lambda x=private: shm.allreduce_(x),
            "shm zero-copy": lambda x=shared: shm.allreduce_(x),
        }
        iters = max(2, min(200, (32 << 20) // size))
        times: dict[str, list[float]] = {name: [] for name in methods}
        for trial in range(args.trials + 1):
            for name, call in methods.items():
                call()
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    call()
                elapsed = torch.tensor([(time.perf_counter() - start) / iters])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a trial's time is the slowest rank's
                if trial:  # the first round warms up
                    times[name].append(elapsed.item())
        for name, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "size": size,
                    "method": name,
                    "seconds": median,
                    "trials": values,
                    "busbw_GBps": size / median * 2 * (world - 1) / world / 1e9,
                }
            )
    latency = {}
    small = torch.ones(1024)
    for name, call in (("gloo", lambda: gloo.allreduce_(small)), ("shm", lambda: shm.allreduce_(small))):
        samples = []
        dist.barrier()
        for _ in range(2000):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        samples.sort()
        latency[name] = {f"p{q}": samples[q * 20 if q else 0] * 1e6 for q in (0, 10, 50, 90)}
    if rank == 0:
        for row in rows:
            print(f"{row['size']:>10} B  {row['method']:14s} busbw {row['busbw_GBps']:.3f} GB/s", flush=True)
        for name, values in latency.items():
            print(
                f"4 KB latency {name}: " + ", ".join(f"{k} {v:.0f} us" for k, v in values.items()), flush=True
            )
        record = {
            "command": os.environ.get("DISTLEARN_BENCH_COMMAND", ""),
            "world_size": world,
            "rows": rows,
            "latency_us": latency,
            "load_average": os.getloadavg(),
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if in_torchrun():
        worker(args)
        return 0
    env = dict(os.environ, DISTLEARN_BENCH_COMMAND=" ".join(["python", *sys.argv]))
    return launch_local(
        [__file__, *sys.argv[1:]], args.world_size, module=False, env=env, timeout_s=900, threads_per_worker=1
    )


if __name__ == "__main__":
    sys.exit(main())
