"""Synchronous data parallelism: our sync strategy against torch DistributedDataParallel, in one run.

Claims (issue 5), measured side by side in one torchrun job of R processes on this machine:
1. samples/s of our sync strategy (``distlearn.parallelize(..., strategy="sync")``, buckets + overlap, the
   backend's allreduce) against ``torch.nn.parallel.DistributedDataParallel`` on the same model, batches
   and world size (goal >= 1.0x);
2. time per step saved by overlap and by bucketing: buckets + overlap vs buckets only vs one message per
   tensor without overlap;
3. the same for each of our reduction algorithms (``--reducers``, shm included);
4. DDP with our reducers as its comm hook (``--hooks``, default shm) against DDP's own allreduce.

Each configuration trains ``--steps`` steps from the same weights on the same random batches (throughput
does not depend on the pixel values; the synthetic batches have the shape of the named model's data).
Configurations are interleaved over ``--trials`` rounds, in an order rotated by one each round, and we
report the median. On this 2-core machine
R = 2 uses one core per process; larger R oversubscribes the cores and measures contention, not scaling.

    python benchmarks/sync_bench.py [--workers 2] [--model lenet] [--batch 256] [--steps 30] [--trials 5]
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distlearn.comm.ddp_hooks import as_ddp_comm_hook
from distlearn.comm.reducers import create_reducer
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown
from distlearn.models import create_model
from distlearn.parallel.sync import SyncDataParallel

SHAPES = {"mlp": (1, 28), "lenet": (1, 28), "resnet8": (3, 32), "resnet20": (3, 32)}


def build(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    channels, side = SHAPES[model_name]
    return create_model(model_name, in_channels=channels, num_classes=10, image_size=side)


def run_ours(args, batches, reducer: str, bucket_mb: float, overlap: bool) -> tuple[float, int]:
    model = build(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    strategy = SyncDataParallel(reducer=reducer, bucket_mb=bucket_mb, overlap=overlap, timeout_s=120)
    strategy.setup(0)
    model, optimizer = strategy.prepare(model, optimizer)
    dist.barrier()
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        strategy.before_step(model, optimizer, step)
        optimizer.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    sent = strategy.stats()["bytes_sent"]
    strategy.close()
    return elapsed, sent


def run_ddp(args, batches, hook: str | None = None) -> tuple[float, int]:
    model = DistributedDataParallel(build(args.model))
    reducer = create_reducer(hook, timeout_s=120) if hook else None
    if reducer is not None:  # our reducer inside DDP's buckets and overlap
        model.register_comm_hook(state=None, hook=as_ddp_comm_hook(reducer))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dist.barrier()
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if reducer is None:
        return elapsed, 0
    reducer.close()
    return elapsed, reducer.bytes_sent


def worker(args) -> None:
    context = init_distributed(timeout_s=120)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.world_size))
    local = args.batch // context.world_size
    channels, side = SHAPES[args.model]
    generator = torch.Generator().manual_seed(1 + context.rank)
    batches = []
    for _ in range(args.steps):
        x = torch.randn(local, channels, side, side, generator=generator)
        batches.append((x, torch.randint(0, 10, (local,), generator=generator)))
    configs = {"ddp": lambda: run_ddp(args, batches)}
    for hook in args.hooks.split(","):
        if hook:
            configs[f"ddp + {hook} comm hook"] = lambda h=hook: run_ddp(args, batches, h)
    configs["ours: buckets + overlap"] = lambda: run_ours(args, batches, "backend", 25.0, True)
    configs["ours: buckets, no overlap"] = lambda: run_ours(args, batches, "backend", 25.0, False)
    configs["ours: per tensor, no overlap"] = lambda: run_ours(args, batches, "backend", 0.0, False)
    for reducer in args.reducers.split(","):
        if reducer and reducer != "backend":
            configs[f"ours: {reducer}, buckets + overlap"] = lambda r=reducer: run_ours(
                args, batches, r, 25.0, True
            )
    for run in configs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in configs}
    sent: dict[str, int] = {}
    names = list(configs)
    for trial in range(args.trials):  # rotate the order so that no configuration always follows another
        shift = trial % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, nbytes = configs[name]()
            times[name].append(seconds)
            sent[name] = nbytes
    if context.rank == 0:
        samples = args.steps * args.batch
        ddp = statistics.median(times["ddp"])
        setting = (
            f"R = {context.world_size}, global batch {args.batch}, {args.steps} steps x {args.trials} trials"
        )
        print(f"\n{args.model}, {setting}")
        print(f"{'configuration':<38} {'samples/s':>10} {'ms/step':>8} {'vs DDP':>7}")
        rows = []
        for name, values in times.items():
            median = statistics.median(values)
            per_step = 1e3 * median / args.steps
            print(f"{name:<38} {samples / median:>10.0f} {per_step:>8.2f} {ddp / median:>7.2f}x")
            rows.append({"configuration": name, "seconds": values, "samples_per_s": samples / median,
                         "vs_ddp": ddp / median, "bytes_sent_rank0": sent[name]})  # fmt: skip
        record = {
            "command": "python benchmarks/sync_bench.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
            "versions": {"torch": str(torch.__version__)},
            "world_size": context.world_size,
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="lenet", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--reducers", default="ring,rabenseifner,segmented-ring,tree,shm")
    parser.add_argument("--hooks", default="shm", help="our reducers as DDP comm hooks (comma-separated)")
    parser.add_argument("--out", default="benchmarks/results/sync_bench.json")
    args = parser.parse_args(argv)
    if in_torchrun():
        worker(args)
        return 0
    return launch_local([__file__, *(argv if argv is not None else sys.argv[1:])], args.workers, module=False,
                        timeout_s=900)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
