"""A torchrun worker for tests/comm/test_hierarchical.py: the hierarchical reducer against dist.all_reduce.

    python -m torch.distributed.run --nnodes H --nproc-per-node L --node-rank h ... hierarchical_worker.py OUT

Every rank runs the hierarchical reducer (each inner algorithm) on many lengths and dtypes of integer-valued
inputs (exact in every dtype whatever the summation order) and compares with ``dist.all_reduce`` bitwise;
then asynchronous calls, a non-contiguous tensor, and one call of 1000 float32 elements whose ``bytes_sent``
and ``inter_host_bytes`` it records. Each rank writes ``OUT/rank{r}.json`` (failures recorded, not raised).

    ... hierarchical_worker.py OUT die TIMEOUT

After one good allreduce the last rank leaves without a word; the others record the error of the next one
(``OUT/rank{r}.json``).

    ... hierarchical_worker.py OUT then-die TIMEOUT

Both in one job: every check first (``OUT/rank{r}.json``), then the same death (``OUT/die{r}.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from distlearn.comm.reducers import create_reducer
from distlearn.launch import init_distributed, shutdown


def make_input(rank: int, case: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * case + rank)
    return torch.randint(-8, 9, (n,), generator=generator).to(dtype)


def die(out: str, timeout_s: float, context=None, prefix: str = "rank") -> None:
    context = context or init_distributed(timeout_s=60)
    rank, world = context.rank, context.world_size
    reducer = create_reducer("hierarchical", timeout_s=timeout_s)
    reducer.allreduce_(torch.ones(1000))  # a job that worked until now
    dist.barrier()
    if rank == world - 1:
        os._exit(0)  # gone without a word
    start = time.monotonic()
    result: dict = {"rank": rank}
    try:
        reducer.allreduce_(torch.ones(100_000))
        result["error"] = None
    except Exception as error:  # noqa: BLE001 -- recorded: the test requires CommError
        result.update(error=str(error), type=type(error).__name__)
    result["seconds"] = time.monotonic() - start
    with open(os.path.join(out, f"{prefix}{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # the group is broken: no collective goodbye


def main(out: str, then_die_s: float | None = None) -> None:
    context = init_distributed(timeout_s=60)
    rank, world = context.rank, context.world_size
    failures: list[str] = []
    results: dict = {"rank": rank, "node": int(os.environ["GROUP_RANK"]), "local_rank": context.local_rank}
    try:
        reducers = {
            inner: create_reducer("hierarchical", inner=inner, timeout_s=30)
            for inner in ("ring", "tree", "rabenseifner", "segmented-ring", "backend")
        }
        topology = reducers["ring"].topology()
        results["hosts"] = [list(h) for h in topology.hosts]
        results["local"] = topology.local
        lengths = sorted({0, 1, 2, 3, world - 1, world, world + 1, 7, 1001, 65537, 300_001})
        dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
        case = 0
        for n in lengths:
            for dtype in dtypes:
                case += 1
                mine = make_input(rank, case, n, dtype)
                reference = mine.clone()
                dist.all_reduce(reference)
                exact = sum(make_input(r, case, n, torch.float64) for r in range(world))
                for inner, reducer in reducers.items():
                    if inner != "ring" and (n > 65537 or dtype not in (torch.float32, torch.bfloat16)):
                        continue  # the other inner reducers on a subset: their own tests cover the rest
                    got = reducer.allreduce_(mine.clone())
                    label = f"hierarchical(inner={inner}) n={n} {dtype}"
                    if got.dtype != dtype or got.shape != mine.shape:
                        failures.append(f"{label}: dtype/shape changed")
                    elif not torch.equal(got, reference) or not torch.equal(got.double(), exact):
                        failures.append(f"{label}: differs from dist.all_reduce")
        results["cases"] = case
        ring = reducers["ring"]
        # asynchronous calls, then a synchronous one while they are pending
        tensors = [make_input(rank, 10_000 + i, 3000 + 17 * i, torch.float32) for i in range(4)]
        futures = [ring.allreduce_async(t) for t in tensors[:3]]
        values = [f.wait() for f in futures] + [ring.allreduce_(tensors[3])]
        for i, value in enumerate(values):
            exact = sum(make_input(r, 10_000 + i, 3000 + 17 * i, torch.float64) for r in range(world))
            if value is not tensors[i] or not torch.equal(value.double(), exact):
                failures.append(f"async call {i} wrong (or not in place)")
        view = torch.full((3, 5), float(rank + 1)).t()
        ring.allreduce_(view)
        if not (view == world * (world + 1) / 2).all():
            failures.append("non-contiguous view not summed in place")
        fresh = create_reducer("hierarchical")
        fresh.allreduce_(torch.ones(1000))
        results["bytes_sent"] = fresh.bytes_sent
        results["inter_host_bytes"] = fresh.inter_host_bytes
        for reducer in [*reducers.values(), fresh]:
            reducer.close()
    except Exception:
        failures.append(traceback.format_exc())
    results["failures"] = failures
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if then_die_s is not None:
        dist.barrier()  # every rank's checks are written before the last rank leaves
        die(out, then_die_s, context, prefix="die")
    shutdown()


if __name__ == "__main__":
    if sys.argv[2:3] == ["die"]:
        die(sys.argv[1], float(sys.argv[3]))
    elif sys.argv[2:3] == ["then-die"]:
        main(sys.argv[1], float(sys.argv[3]))
    else:
        main(sys.argv[1])
