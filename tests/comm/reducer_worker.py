"""A torchrun worker for tests/comm/test_reducers.py: runs every reducer on many cases in one job.

    python -m torch.distributed.run --nproc-per-node R tests/comm/reducer_worker.py MODE OUT

MODE ``check`` compares every algorithm with ``dist.all_reduce`` and with the sum computed locally from every
rank's (deterministic) input, records ``bytes_sent`` of single calls, and exercises async futures and a
subgroup. MODE ``batched`` runs every point-to-point algorithm in batched rounds (``batched=True``, the
NCCL path, here on gloo) against ``dist.all_reduce``, the exact sum, and the same algorithm unbatched
(bitwise: the same sums in the same order), and records both paths' ``bytes_sent``. MODE ``shm`` runs
tests/comm/shm_worker.py's ``check`` (the shm reducer's own cases). A list such as ``check,batched,shm``
runs them in one job (one start of the ranks), each mode's results under its name, the shm cases last (their
mismatched call ends in an error on purpose). MODE ``die``: rank 1
leaves before the allreduce (``die S both``: rank 0 then tries every algorithm unbatched, then every
point-to-point one in batched rounds, the second set's errors under ``errors batched``); ``hang``: rank 1
stays but never calls. Each rank writes ``OUT/rank{r}.json`` (failures are recorded there, not raised, so
the test can show them all).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from distlearn.comm.reducers import REDUCERS, Channel, create_reducer
from distlearn.errors import CommError
from distlearn.launch import init_distributed, shutdown

P2P = [name for name, cls in REDUCERS.items() if cls.point_to_point]  # not backend, shm, hierarchical


def make_input(rank: int, case: int, n: int, dtype: torch.dtype, integer: bool) -> torch.Tensor:
    """Rank ``rank``'s tensor for ``case``: a pure function of its arguments, so every rank can rebuild it."""
    generator = torch.Generator().manual_seed(1000 * case + rank)
    if integer:  # small integers: every partial sum is exact in every dtype, whatever the order
        return torch.randint(-8, 9, (n,), generator=generator).to(dtype)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


def reducers_for(name: str) -> list:
    if name == "backend":
        return [create_reducer(name)]
    if name in ("segmented-ring", "tree"):  # tiny segments: many per chunk (ring) or per vector (tree)
        instances = [create_reducer(name, segment_bytes=8), create_reducer(name, segment_bytes=4096)]
        if name == "tree":
            instances.append(create_reducer(name, segment_bytes=None))  # the textbook tree
    else:
        instances = [create_reducer(name)]
    return [*instances, create_reducer(name, duplex=False)]  # everything on one group (float32 only)


def check(rank: int, world: int, failures: list[str], results: dict) -> None:
    lengths = sorted({0, 1, 2, 3, max(world - 1, 0), world, world + 1, 7, 100, 1001, 4099, 65537})
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    reducers = {name: reducers_for(name) for name in REDUCERS}
    case = 0
    for n in lengths:
        for dtype in dtypes:
            for integer in (True, False):
                if not integer and dtype in (torch.float16, torch.bfloat16) and n > 1001:
                    continue
                case += 1
                mine = make_input(rank, case, n, dtype, integer)
                reference = mine.clone()
                dist.all_reduce(reference)
                exact = sum(make_input(r, case, n, torch.float64, integer) for r in range(world))
                for instances in reducers.values():
                    for reducer in instances:
                        if getattr(reducer, "segment_bytes", None) == 8 and n > 1001:
                            continue  # thousands of 2-element messages: slow, and nothing new
                        if not reducer.duplex and dtype != torch.float32:
                            continue
                        got = reducer.allreduce_(mine.clone())
                        label = f"{reducer!r} n={n} {dtype} integer={integer}"
                        if got.dtype != dtype or got.shape != mine.shape:
                            failures.append(f"{label}: dtype/shape changed to {got.dtype} {tuple(got.shape)}")
                        elif integer:
                            if not torch.equal(got, reference) or not torch.equal(got.double(), exact):
                                failures.append(f"{label}: integer sum differs from dist.all_reduce")
                        else:
                            tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
                            if not torch.allclose(got.double(), exact, rtol=tol, atol=tol * world):
                                err = (got.double() - exact).abs().max().item()
                                failures.append(f"{label}: max error {err:g} vs the exact sum")
    results["cases"] = case

    # shapes: a 2-D tensor and a non-contiguous view are summed in place, keeping their shape
    for name in REDUCERS:
        reducer = create_reducer(name)
        matrix = torch.full((5, 3), float(rank + 1))
        view = torch.full((3, 5), float(rank + 1)).t()
        reducer.allreduce_(matrix)
        reducer.allreduce_(view)
        expected = world * (world + 1) / 2
        if not (matrix == expected).all() or not (view == expected).all() or view.shape != (5, 3):
            failures.append(f"{name}: 2-D or non-contiguous tensor not summed in place")

    # bytes sent by one call of n float32 elements, on fresh reducers
    results["bytes"] = {}
    for name in REDUCERS:
        results["bytes"][name] = {}
        for n in (1000, 5, 1):
            reducer = (
                create_reducer(name, segment_bytes=12)
                if name in ("segmented-ring", "tree")
                else create_reducer(name)
            )
            reducer.allreduce_(torch.ones(n))
            results["bytes"][name][str(n)] = reducer.bytes_sent

    # async: several outstanding calls, then a synchronous one while they are pending
    for name in REDUCERS:
        reducer = create_reducer(name)
        tensors = [make_input(rank, 10_000 + i, 3000 + 17 * i, torch.float32, True) for i in range(5)]
        futures = [reducer.allreduce_async(t) for t in tensors[:4]]
        last = reducer.allreduce_(tensors[4])
        values = [future.wait() for future in futures] + [last]
        for i, value in enumerate(values):
            exact = sum(make_input(r, 10_000 + i, 3000 + 17 * i, torch.float64, True) for r in range(world))
            if value is not tensors[i] or not torch.equal(value.double(), exact):
                failures.append(f"{name}: async call {i} wrong (or not in place)")
        reducer.close()

    # a subgroup (ranks renumbered): for R >= 3 every rank but 1
    if world >= 3:
        members = [r for r in range(world) if r != 1]
        group = dist.new_group(members)
        if rank in members:
            for name in REDUCERS:
                value = torch.full((11,), float(rank))
                create_reducer(name).allreduce_(value, group)
                if not (value == float(sum(members))).all():
                    failures.append(f"{name}: subgroup {members} sum {value[0].item()} != {sum(members)}")
        dist.barrier()


def batched(rank: int, world: int, failures: list[str], results: dict) -> None:
    lengths = sorted({0, 1, 2, 3, max(world - 1, 0), world, world + 1, 7, 1001, 65537})
    variants = {
        "ring": [{}],
        "rabenseifner": [{}],
        "segmented-ring": [{"segment_bytes": 8}, {"segment_bytes": 4096}],
        "tree": [{"segment_bytes": 8}, {"segment_bytes": 4096}, {"segment_bytes": None}],
    }
    case = 0
    for n in lengths:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for integer in (True, False):
                case += 1
                mine = make_input(rank, case, n, dtype, integer)
                reference = mine.clone()
                dist.all_reduce(reference)
                exact = sum(make_input(r, case, n, torch.float64, integer) for r in range(world))
                for name, options in variants.items():
                    for option in options:
                        if option.get("segment_bytes") == 8 and n > 1001:
                            continue  # thousands of 2-element rounds: slow, and nothing new
                        got = create_reducer(name, batched=True, **option).allreduce_(mine.clone())
                        plain = create_reducer(name, batched=False, **option).allreduce_(mine.clone())
                        label = f"batched {name} {option} n={n} {dtype} integer={integer}"
                        if got.dtype != dtype or got.shape != mine.shape:
                            failures.append(f"{label}: dtype/shape changed")
                        elif not torch.equal(got, plain):
                            failures.append(f"{label}: differs from the unbatched {name}")
                        elif integer and not (
                            torch.equal(got, reference) and torch.equal(got.double(), exact)
                        ):
                            failures.append(f"{label}: integer sum differs from dist.all_reduce")
                        elif not integer:
                            tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
                            if not torch.allclose(got.double(), exact, rtol=tol, atol=tol * world):
                                failures.append(f"{label}: far from the exact sum")
    results["cases"] = case
    for name in P2P:  # the rounds posted one message at a time (Channel.exchange unbatched): the same sums
        reducer = create_reducer(name, batched=False)
        mine = make_input(rank, 30_000, 1001, torch.float32, False)
        plain = reducer.allreduce_(mine.clone())
        channel = Channel(reducer, None, 60.0, batched=False)
        channel.run_rounds(reducer._rounds(mine, channel))
        if not torch.equal(mine, plain):
            failures.append(f"{name}: rounds posted one by one differ from the algorithm")
    results["bytes"] = {}
    for name in P2P:
        for mode in (True, False):
            for n in (1000, 5, 1):
                options = {"segment_bytes": 12} if name in ("segmented-ring", "tree") else {}
                reducer = create_reducer(name, batched=mode, **options)
                reducer.allreduce_(torch.ones(n))
                results["bytes"][f"{name} batched={mode} n={n}"] = reducer.bytes_sent
    for name in P2P:  # async calls in batched rounds, then a synchronous one while they are pending
        reducer = create_reducer(name, batched=True)
        tensors = [make_input(rank, 20_000 + i, 3000 + 17 * i, torch.float32, True) for i in range(4)]
        futures = [reducer.allreduce_async(t) for t in tensors[:3]]
        values = [future.wait() for future in futures] + [reducer.allreduce_(tensors[3])]
        for i, value in enumerate(values):
            exact = sum(make_input(r, 20_000 + i, 3000 + 17 * i, torch.float64, True) for r in range(world))
            if value is not tensors[i] or not torch.equal(value.double(), exact):
                failures.append(f"batched {name}: async call {i} wrong (or not in place)")
        reducer.close()
    if world >= 3:  # a subgroup without rank 1 (ranks renumbered)
        members = [r for r in range(world) if r != 1]
        group = dist.new_group(members)
        if rank in members:
            for name in P2P:
                value = torch.full((11,), float(rank))
                create_reducer(name, batched=True).allreduce_(value, group)
                if not (value == float(sum(members))).all():
                    failures.append(f"batched {name}: subgroup {members} sum wrong")
        dist.barrier()


def failure_mode(mode: str, rank: int, results: dict, timeout_s: float) -> None:
    # after a timeout the group is broken, so a hang is tested with one algorithm per job; a peer that
    # left fails every later call at once, so one die job may try every algorithm unbatched and batched
    names = list(REDUCERS) if mode == "die" else [sys.argv[4]]
    forced = {"batched": True} if "batched" in sys.argv[4:] else {}  # the batched rounds' errors
    if rank == 1:
        if mode == "die":
            os._exit(0)  # gone without a word: the sockets close
        time.sleep(timeout_s * len(names) + 4)  # alive, but never calls
        return
    if "both" in sys.argv[4:]:
        passes = [("errors", {}), ("errors batched", {"batched": True})]
    else:
        passes = [("errors", forced)]
    for key, rounds in passes:
        errors = {}
        for name in names:
            start = time.monotonic()
            try:
                options = rounds if name != "backend" else {}
                create_reducer(name, timeout_s=timeout_s, **options).allreduce_(torch.ones(1000))
                errors[name] = {"error": None}
            except CommError as error:
                errors[name] = {"error": str(error), "seconds": time.monotonic() - start}
            except Exception as error:  # noqa: BLE001 -- recorded: the test requires CommError
                errors[name] = {"error": f"{type(error).__name__}: {error}", "wrong_type": True}
        results[key] = errors


def shm(rank: int, world: int, failures: list[str], results: dict) -> None:
    from shm_worker import check as shm_check  # beside this file (the script's directory is on sys.path)

    shm_check(rank, world, failures, results)


MODES = {"check": check, "batched": batched, "shm": shm}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    context = init_distributed(timeout_s=60)
    rank, world = context.rank, context.world_size
    with open(os.path.join(out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    results: dict = {"rank": rank, "world": world}
    failures: list[str] = []
    modes = mode.split(",")
    try:
        if set(modes) <= set(MODES):
            for each in modes:  # each mode's cases, failures and bytes under its own name
                results[each] = {"failures": []}
                MODES[each](rank, world, results[each]["failures"], results[each])
        else:
            warm = [{}, {"batched": True}] if "both" in sys.argv[4:] else [{}]
            if "batched" in sys.argv[4:]:
                warm = [{"batched": True}]
            for options in warm:  # a job that worked until now (this also creates the duplex twin group)
                for name in REDUCERS:
                    create_reducer(name, **(options if name != "backend" else {})).allreduce_(torch.ones(10))
            dist.barrier()
            failure_mode(mode, rank, results, float(sys.argv[3]))
    except Exception:  # noqa: BLE001 -- reported to the test
        failures.append(traceback.format_exc())
    results["failures"] = failures
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if set(modes) <= set(MODES):
        shutdown()
    else:
        os._exit(0)  # the group is broken; leave without a collective goodbye


if __name__ == "__main__":
    main()
