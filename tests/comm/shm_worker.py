"""A worker for tests/comm/test_shm_reducer.py: the shm reducer against ``dist.all_reduce`` in one job.

    python -m torch.distributed.run --nproc-per-node R tests/comm/shm_worker.py check OUT
    python tests/comm/shm_worker.py MODE OUT [TIMEOUT]    (started by the test with RANK etc. set)

``check`` runs every case (sizes, dtypes, bits on every rank, async, non-contiguous, shared buffers,
reduce_scatter_/all_gather_, bytes sent, a mismatched call); the test suite runs this ``check`` inside
tests/comm/reducer_worker.py's job (mode ``shm``), one job per world size for both files' cases. The
failure modes are started by the test itself, not by torchrun (whose agent would stop the survivors when a
rank is killed): ``kill`` (rank 1 kills itself with SIGKILL between two allreduces), ``hang`` (rank 1
never calls), ``setup-kill`` (rank 1 is killed right after creating its segment, before the names are
exchanged), ``invisible`` (rank 1's segments live in another directory, as on another host), ``once``
(one allreduce). Each rank writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist

from distlearn.comm import shm_segments
from distlearn.comm.reducers import ShmReducer, chunk_bounds, create_reducer
from distlearn.errors import CommError, ConfigError
from distlearn.launch import init_distributed, shutdown

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]


def make_input(rank: int, case: int, n: int, dtype: torch.dtype, integer: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * case + rank)
    if integer:  # small integers: every partial sum is exact in every dtype, whatever the order
        return torch.randint(-8, 9, (n,), generator=generator).to(dtype)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


def same_on_every_rank(tensor: torch.Tensor) -> bool:
    """Whether every rank holds the same bits (compared as int64 words through gloo)."""
    raw = tensor.contiguous().view(-1).view(torch.uint8)
    padded = torch.zeros(-(-raw.numel() // 8) * 8, dtype=torch.uint8)
    padded[: raw.numel()] = raw
    words = padded.view(torch.int64)
    lowest, highest = words.clone(), words.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    return torch.equal(lowest, highest)


def check(rank: int, world: int, failures: list[str], results: dict) -> None:
    reducer = create_reducer("shm", timeout_s=60)
    small = ShmReducer(piece_bytes=64, timeout_s=60)  # many pieces: pipelining and slot reuse
    medium = ShmReducer(piece_bytes=4096, timeout_s=60)
    sizes = sorted({0, 1, 2, 3, max(world - 1, 0), world + 1, 4095, 4096, 65537, 10**6 + 3})
    case = 0
    for n in sizes:
        for dtype in DTYPES:
            case += 1
            mine = make_input(rank, case, n, dtype)
            reference = mine.clone()
            dist.all_reduce(reference)
            for which in [reducer, small] if n <= 4096 else [reducer, medium] if n <= 65537 else [reducer]:
                got = which.allreduce_(mine.clone())
                if got.dtype != dtype or not torch.equal(got, reference):
                    failures.append(f"{which!r} n={n} {dtype}: differs from dist.all_reduce")
    if world == 2:  # 10^7 elements
        mine = make_input(rank, 999, 10**7, torch.float32)
        reference = mine.clone()
        dist.all_reduce(reference)
        if not torch.equal(reducer.allreduce_(mine), reference):
            failures.append("n=10^7 float32: differs from dist.all_reduce")
    results["cases"] = case

    # random floats: the same bits on every rank, and the same bits as the pipelined small-piece reducer
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n in (7, 4096, 100_001):
            mine = make_input(rank, 5000 + n, n, dtype, integer=False)
            got = reducer.allreduce_(mine.clone())
            if not same_on_every_rank(got):
                failures.append(f"random {dtype} n={n}: ranks hold different bits")
            if not torch.equal(got, (small if n < 5000 else medium).allreduce_(mine.clone())):
                failures.append(f"random {dtype} n={n}: piece size changed the bits")
            exact = sum(make_input(r, 5000 + n, n, torch.float64, integer=False) for r in range(world))
            tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
            if not torch.allclose(got.double(), exact, rtol=tol, atol=tol * world):
                failures.append(f"random {dtype} n={n}: far from the exact sum")

    # async calls in order, then a synchronous one while they are pending, then reduce_scatter_ queued too
    tensors = [make_input(rank, 10_000 + i, 3000 + 17 * i, torch.float32) for i in range(6)]
    futures = [reducer.allreduce_async(t) for t in tensors[:4]]
    last = reducer.allreduce_(tensors[4])
    futures.append(reducer.allreduce_async(tensors[5]))
    scatter = make_input(rank, 10_100, 999, torch.float64)
    start, stop = reducer.reduce_scatter_(scatter)  # waits for the outstanding future first
    values = [f.wait() for f in futures[:4]] + [last, futures[4].wait()]
    for i, value in enumerate(values):
        exact = sum(make_input(r, 10_000 + i, 3000 + 17 * i, torch.float64) for r in range(world))
        if value is not tensors[i] or not torch.equal(value.double(), exact):
            failures.append(f"async call {i} wrong (or not in place)")
    exact = sum(make_input(r, 10_100, 999, torch.float64) for r in range(world))
    if (start, stop) != chunk_bounds(999, world)[rank] or not torch.equal(
        scatter[start:stop], exact[start:stop]
    ):
        failures.append(f"reduce_scatter_ after async calls: shard {start}:{stop} wrong")

    # non-contiguous and 2-D tensors, summed in place
    view = torch.full((3, 5), float(rank + 1)).t()
    matrix = torch.arange(12.0).reshape(3, 4) * (rank + 1)
    reducer.allreduce_(view)
    reducer.allreduce_(matrix)
    total = world * (world + 1) / 2
    if (
        view.shape != (5, 3)
        or not (view == total).all()
        or not torch.equal(matrix, torch.arange(12.0).reshape(3, 4) * total)
    ):
        failures.append("non-contiguous or 2-D tensor not summed in place")

    # reduce_scatter_ and all_gather_ directly, several dtypes and lengths
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for n in (1, world + 1, 4097, 70_001):
            case += 1
            mine = make_input(rank, case, n, dtype)
            exact = sum(make_input(r, case, n, torch.float64) for r in range(world))
            for which in (reducer, small if n < 5000 else medium):
                flat = mine.clone()
                start, stop = which.reduce_scatter_(flat)
                if (start, stop) != chunk_bounds(n, world)[rank] or not torch.equal(
                    flat[start:stop].double(), exact[start:stop]
                ):
                    failures.append(f"{which!r} reduce_scatter_ n={n} {dtype}: shard wrong")
                gathered = torch.full((n,), -1, dtype=dtype)
                gathered[start:stop] = flat[start:stop]
                which.all_gather_(gathered)
                if not torch.equal(gathered.double(), exact):
                    failures.append(f"{which!r} all_gather_ n={n} {dtype}: not every shard arrived")

    # the zero-copy path: a shared buffer, a view of it, mixed with staged calls
    for which in (reducer, medium):
        before = which.bytes_sent
        buffer = which.shared_buffer(50_001, torch.float32)
        other = which.shared_buffer(3, torch.int64)
        mark = (rank + 1) * torch.arange(50_001.0)
        for trial in range(3):
            buffer.copy_(mark + trial)
            which.allreduce_(buffer)
            if not torch.equal(buffer, total * torch.arange(50_001.0) + world * trial):
                failures.append(f"{which!r} shared buffer, call {trial}: wrong sum")
            staged = make_input(rank, 20_000 + trial, 999, torch.float32)
            exact = sum(make_input(r, 20_000 + trial, 999, torch.float64) for r in range(world))
            if not torch.equal(which.allreduce_(staged).double(), exact):
                failures.append(f"{which!r} staged call between shared ones: wrong sum")
        part = buffer[1000:31_000]
        part.fill_(rank + 1)
        which.allreduce_(part)
        other.fill_(rank)
        which.allreduce_(other)
        if not (part == total).all() or not (other == world * (world - 1) // 2).all():
            failures.append(f"{which!r} a view of a shared buffer / an int64 buffer: wrong sum")
        if not (buffer[:1000] == total * torch.arange(1000.0) + world * 2).all():
            failures.append(f"{which!r} allreduce of a view touched the rest of the buffer")
        results.setdefault("buffer_bytes", []).append(which.bytes_sent - before)

    # bytes sent by single calls on fresh reducers
    results["bytes"] = {}
    for n in (1000, 5, 1):
        fresh = create_reducer("shm")
        fresh.allreduce_(torch.ones(n))
        results["bytes"][str(n)] = fresh.bytes_sent

    # a mismatched call (different lengths): a CommError on every rank, naming the other rank's call
    odd = create_reducer("shm", timeout_s=20)
    odd.allreduce_(torch.ones(4))
    try:
        odd.allreduce_(torch.ones(10 + rank))
        results["mismatch"] = None
    except CommError as error:
        results["mismatch"] = str(error)
    try:  # shared buffers of different sizes: a ConfigError on every rank
        create_reducer("shm").shared_buffer(10 + rank)
        results["buffer_mismatch"] = None
    except ConfigError as error:
        results["buffer_mismatch"] = str(error)
    dist.barrier()
    results["files"] = sorted(os.listdir(shm_segments.directory()))


def failure(mode: str, rank: int, world: int, results: dict, timeout_s: float) -> None:
    if mode == "setup-kill" and rank == 1:
        create = shm_segments.Segment.create.__func__

        def create_then_die(cls, path, nbytes):  # the file exists; the process dies before the exchange
            segment = create(cls, path, nbytes)
            os.kill(os.getpid(), signal.SIGKILL)
            return segment

        shm_segments.Segment.create = classmethod(create_then_die)
    if mode == "invisible" and rank == 1:
        os.environ[shm_segments.DIRECTORY_ENV] = sys.argv[4]  # another directory: as on another host
    reducer = create_reducer("shm", timeout_s=timeout_s)
    start = time.monotonic()
    try:
        if mode in ("kill", "hang"):
            reducer.allreduce_(torch.ones(1000))  # a job that worked until now
            dist.barrier()
            if rank == 1:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(timeout_s + 5)  # alive, but never calls
                return
            start = time.monotonic()
            reducer.allreduce_(torch.ones(100_000))
        else:
            reducer.allreduce_(torch.ones(1000))
        results["error"] = None
    except (CommError, ConfigError) as error:
        results["error"] = f"{type(error).__name__}: {error}"
    results["seconds"] = time.monotonic() - start


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    rank, world = context.rank, context.world_size
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    results: dict = {"rank": rank, "world": world}
    failures: list[str] = []
    try:
        if mode == "check":
            check(rank, world, failures, results)
        else:
            failure(mode, rank, world, results, float(sys.argv[3]))
    except Exception:  # noqa: BLE001 -- reported to the test
        failures.append(traceback.format_exc())
    results["failures"] = failures
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if mode == "check":
        shutdown()
    else:
        os._exit(0)  # the group may be broken; leave without a collective goodbye


if __name__ == "__main__":
    main()
