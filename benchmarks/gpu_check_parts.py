"""The measurements of ``benchmarks/gpu_check.py``, one function per part; each runs in its own process.

``gpu_check.py`` starts ``python gpu_check.py --part NAME --device DEV --result FILE`` for each part, with
a deadline, so that a crash, a hang or a CUDA error in one part cannot take the others with it. Every
function here returns a JSON-ready dict ``{"status": "passed" | "failed", "items": [...], ...}``; one item
per codec, reducer or run, each with its own ``status`` and, when it failed, the ``error`` message.

On a machine without CUDA (``--allow-cpu``) the same code runs on the CPU, with gloo where NCCL would be:
the "cpu stand-in" that lets the CPU test suite run the whole script.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SIZES = {  # the bucket the codecs and reducers are timed on: a gradient, laid out as the bucketer does
    "quick": ("mlp-small", [(64, 32), (64,), (10, 64), (10,)]),
}
CODEC_OPTIONS: dict[str, dict[str, Any]] = {
    "qsgd": {"levels": 4},
    "topk": {"density": 0.01},
    "randomk": {"density": 0.01},
    "dgc": {"density": 0.01},
    "powersgd": {"rank": 2, "start_iter": 0},
}
"""Each codec's options in the check (the rest take their defaults); densities as compression_bench's."""


def error_text(error: BaseException) -> str:
    """The first line of an error, with its type (what a table cell can hold)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def bucket_shapes(quick: bool) -> tuple[str, list[tuple[int, ...]]]:
    """The bucket to time: LeNet's gradient (the bucketer's order) or, with ``quick``, a small MLP's."""
    if quick:
        return SIZES["quick"]
    from distlearn.models import create_model

    model = create_model("lenet", in_channels=1, num_classes=10, image_size=28)
    return "lenet", [tuple(p.shape) for p in reversed(list(model.parameters()))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], Any], device: torch.device, *, warmup: int, trials: int) -> list[float]:
    """Wall seconds of ``trials`` calls of ``run`` after ``warmup`` calls, each bracketed by a device
    synchronisation (what a training step waiting on the result sees)."""
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def count_syncs(run: Callable[[], Any], device: torch.device) -> int | None:
    """Host synchronisations in one call of ``run``, as CUDA's sync debug mode reports them (None on CPU)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_group(backend: str) -> None:
    """A process group of one rank (NCCL on CUDA, gloo for the stand-in), through a file store."""
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def close_group() -> None:
    from distlearn.comm.groups import release_groups

    release_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


def summarise(items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    failed = [item for item in items if item["status"] == "failed"]
    return {"status": "failed" if failed else "passed", "items": items, **extra}


# -- (c) codecs --------------------------------------------------------------------------------------------


def codecs(device: torch.device, quick: bool) -> dict[str, Any]:
    """Every codec's encode + decode (PowerSGD: its ``reduce`` at R = 1) on ``device``, against the dense
    allreduce of the same float32 bucket on a one-rank group (NCCL on CUDA: a device copy, not a network)."""
    from distlearn.comm.compression import (
        COMPRESSORS,
        BucketContext,
        CollectiveCodec,
        Exchange,
        create_compressor,
    )

    model, shapes = bucket_shapes(quick)
    numel = sum(math.prod(s) for s in shapes)
    warmup, trials = (1, 3) if quick else (3, 15)
    gradient = torch.randn(numel, generator=torch.Generator().manual_seed(0)).mul_(1e-2).to(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dense: dict[str, Any] = {"backend": backend, "bytes": 4 * numel}
    try:
        one_rank_group(backend)
        buffer = gradient.clone()
        times = median_seconds(lambda: dist.all_reduce(buffer), device, warmup=warmup, trials=trials)
        dense.update(status="ok", median_s=statistics.median(times), times_s=times)
    except Exception as error:  # noqa: BLE001 -- recorded, the codecs still run
        dense.update(status="failed", error=error_text(error))
    finally:
        close_group()
    items = []
    for name in COMPRESSORS:
        item: dict[str, Any] = {"name": name, "options": CODEC_OPTIONS.get(name, {})}
        try:
            codec = create_compressor(name, **item["options"])
            context = BucketContext("0", shapes, world_size=1, seed=0, stream_seed=11)
            if isinstance(codec, CollectiveCodec):

                def run(codec=codec, context=context):
                    return codec.reduce(gradient.clone(), context, Exchange())

                item["timed"] = "reduce (R = 1)"
            else:

                def run(codec=codec, context=context):
                    return codec.decode(codec.encode(gradient.clone(), context), context)

                item["timed"] = "encode + decode"
            out = run()
            if out.device != gradient.device or out.shape != gradient.shape:
                raise RuntimeError(
                    f"decoded {tuple(out.shape)} on {out.device}, expected {numel} on {device}"
                )
            if not bool(torch.isfinite(out).all()):
                raise RuntimeError("the decoded bucket holds inf or NaN")
            times = median_seconds(run, device, warmup=warmup, trials=trials)
            item.update(status="ok", median_s=statistics.median(times), times_s=times)
            item["relative_error"] = float((out - gradient).norm() / gradient.norm())
            item["syncs"] = count_syncs(run, device)
            if dense.get("median_s"):
                item["vs_dense_allreduce"] = item["median_s"] / dense["median_s"]
        except Exception as error:  # noqa: BLE001 -- one codec's failure is its row, not the part's end
            item.update(status="failed", error=error_text(error))
        items.append(item)
        print(f"codec {name}: {item['status']} {item.get('median_s', item.get('error'))}", flush=True)
    result = summarise(items, bucket=model, numel=numel, dense_allreduce=dense)
    if dense["status"] == "failed":
        result["status"] = "failed"
    return result


# -- (d) reducers at R = 1 ---------------------------------------------------------------------------------


def reducers_r1(device: torch.device, quick: bool) -> dict[str, Any]:
    """Every reducer on a one-rank group (NCCL on CUDA): the sum over one rank is the tensor, exactly."""
    from distlearn.comm.reducers import REDUCERS, create_reducer

    _, shapes = bucket_shapes(quick)
    numel = sum(math.prod(s) for s in shapes)
    warmup, trials = (1, 3) if quick else (3, 15)
    backend = "nccl" if device.type == "cuda" else "gloo"
    items = []
    try:
        one_rank_group(backend)
    except Exception as error:  # noqa: BLE001
        return {"status": "failed", "backend": backend, "error": error_text(error), "items": []}
    try:
        for name in REDUCERS:
            item: dict[str, Any] = {"name": name, "backend": backend}
            try:
                reducer = create_reducer(name, timeout_s=30.0)
                original = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(device)
                work = original.clone()
                reducer.allreduce_(work)
                exact = bool(torch.equal(work, original))
                # the asynchronous path too: the reducer's worker thread (backend: the group's own queue)
                exact_async = bool(torch.equal(reducer.allreduce_async(work).wait(), original))
                item["exact_async"] = exact_async
                exact = exact and exact_async
                times = median_seconds(
                    lambda r=reducer, w=work: r.allreduce_(w), device, warmup=warmup, trials=trials
                )
                reducer.close()
                item.update(
                    status="ok" if exact else "failed", exact=exact, median_s=statistics.median(times)
                )
                if not exact:
                    item["error"] = "the one-rank sum differs from the input"
            except Exception as error:  # noqa: BLE001
                item.update(status="failed", error=error_text(error))
            items.append(item)
            print(f"reducer {name} R=1: {item['status']}", flush=True)
    finally:
        close_group()
    return summarise(items, backend=backend, numel=numel)


# -- (e) reducers at R = 2 on one device, gloo ---------------------------------------------------------------

R2_CODECS = ("fp16", "topk", "onebit", "powersgd")
"""Codecs sent through the compressed reducer at R = 2 (one of each exchange: allreduce, all-gather,
all-gather of bit-packed words, PowerSGD's two allreduces)."""


def _r2_rank(rank: int, port: int, device_name: str, numel: int, result_path: str) -> None:
    """One of two ranks: every reducer on a ``device_name`` tensor, then the same staged through host
    memory; rank 0 writes the items to ``result_path`` after each one (a hang keeps what was done)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from datetime import timedelta

    from distlearn.comm.compression import CompressedReducer, create_compressor
    from distlearn.comm.reducers import REDUCERS, create_reducer

    device = torch.device(device_name)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    items: list[dict[str, Any]] = []

    def save() -> None:
        if rank == 0:
            Path(result_path).write_text(json.dumps(items))

    # integer-valued floats: every summation order gives the same exact sum
    base = torch.arange(numel, dtype=torch.float32).remainder_(1000)
    mine = (base + 1000 * rank).to(device)
    expected = (2 * base + 1000).to(device)
    for staged in (True, False):  # staged first: a crash on the direct path cannot cost its results
        for name in [*REDUCERS, *(f"compressed:{c}" for c in R2_CODECS)]:
            item: dict[str, Any] = {"name": name, "tensor": device_name, "staged": staged}
            try:
                if name.startswith("compressed:"):
                    codec_name = name.partition(":")[2]
                    reducer: Any = CompressedReducer(
                        create_compressor(codec_name, **CODEC_OPTIONS.get(codec_name, {})), timeout_s=10.0
                    )
                else:
                    reducer = create_reducer(name, timeout_s=10.0)
                work = mine.clone()
                start = time.perf_counter()
                if staged:  # what a user can do today: a pinned host copy through gloo, and back
                    host = work.to("cpu").pin_memory() if device.type == "cuda" else work.clone()
                    reducer.allreduce_(host)
                    work.copy_(host, non_blocking=True)
                else:
                    reducer.allreduce_(work)
                synchronize(device)
                item["seconds"] = time.perf_counter() - start
                reducer.close()
                if name.startswith("compressed:"):  # lossy: both ranks must hold the same result
                    gathered = [torch.empty(numel) for _ in range(2)]
                    dist.all_gather(gathered, work.cpu())
                    item["ranks_agree"] = bool(torch.equal(gathered[0], gathered[1]))
                    item["relative_error"] = float((work - expected).norm() / expected.norm())
                    item["status"] = "ok" if item["ranks_agree"] else "failed"
                else:
                    item["exact"] = bool(torch.equal(work, expected))
                    item["status"] = "ok" if item["exact"] else "failed"
                if item["status"] == "failed" and "error" not in item:
                    item["error"] = "the ranks' results differ" if "ranks_agree" in item else "wrong sum"
            except Exception as error:  # noqa: BLE001 -- recorded honestly: gloo p2p may refuse CUDA tensors
                item.update(status="failed", error=error_text(error))
            items.append(item)
            save()
            try:  # realign the ranks after a failure on one side; a broken group ends the loop
                dist.barrier()
            except Exception as error:  # noqa: BLE001
                items.append({"name": "barrier", "status": "failed", "error": error_text(error)})
                save()
                return
    from distlearn.comm.groups import release_groups

    release_groups()
    dist.destroy_process_group()


def reducers_r2(device: torch.device, quick: bool, deadline_s: float) -> dict[str, Any]:
    """Two processes on one device with gloo (NCCL refuses two ranks on one GPU): every reducer on the
    device's tensors directly, then staged through pinned host memory. Failures are results here."""
    import multiprocessing

    _, shapes = bucket_shapes(quick)
    numel = sum(math.prod(s) for s in shapes)
    port = free_port()
    result_path = os.path.join(tempfile.mkdtemp(prefix="gpu_check_r2_"), "items.json")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_r2_rank, args=(rank, port, str(device), numel, result_path))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    end = time.monotonic() + deadline_s
    for process in processes:
        process.join(max(0.0, end - time.monotonic()))
    hung = [process for process in processes if process.is_alive()]
    for process in hung:  # only the two processes started above
        process.kill()
        process.join(5)
    items = json.loads(Path(result_path).read_text()) if Path(result_path).is_file() else []
    result = summarise(items, backend="gloo", numel=numel, world_size=2)
    direct = [i for i in items if not i.get("staged") and i["name"] != "barrier"]
    staged = [i for i in items if i.get("staged")]
    result["direct_ok"] = sum(i["status"] == "ok" for i in direct)
    result["staged_ok"] = sum(i["status"] == "ok" for i in staged)
    # The direct attempts are a finding, not the check's failure: gloo's point-to-point takes CPU tensors
    # only. The part fails when staging fails, when the job hung, or when a process crashed.
    result["status"] = "failed" if any(i["status"] == "failed" for i in staged) or not staged else "passed"
    exits = [process.exitcode for process in processes]
    result["exit_codes"] = exits
    if hung:
        result.update(status="failed", error=f"{len(hung)} rank(s) still running after {deadline_s:.0f} s")
    elif any(code != 0 for code in exits):
        result.update(status="failed", error=f"rank exit codes {exits}")
    return result


# -- one part, in this process -------------------------------------------------------------------------------


def run_part(name: str, device_name: str, quick: bool, deadline_s: float) -> dict[str, Any]:
    """Part ``name`` on ``device_name``; an exception becomes a failed result with its traceback's end."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.monotonic()
    try:
        if name == "codecs":
            result = codecs(device, quick)
        elif name == "reducers_r1":
            result = reducers_r1(device, quick)
        elif name == "reducers_r2":
            result = reducers_r2(device, quick, deadline_s)
        else:
            raise ValueError(f"unknown part {name!r}")
    except Exception as error:  # noqa: BLE001
        result = {"status": "failed", "error": error_text(error), "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = time.monotonic() - started
    return result
