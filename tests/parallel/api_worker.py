"""One rank of the parallelize() checks (test_api.py): ``api_worker.py MODE [ARG]``, as torchrun starts it.

Modes: ``accumulate`` (4 micro-batches on a model of >= 3 buckets vs torch DDP and vs one process on the
full batch), ``resume`` (checkpoint/resume bitwise equal to the uninterrupted run, per strategy),
``ps NAME,NAME..`` (parameter-server variants in a user's loop, one after the other in the same processes:
loss falls), ``alone`` (plain python: one process). Each prints ``OK <what>`` lines the test looks for,
and exits non-zero on the first failed check.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import distlearn
from distlearn.errors import ConfigError

MICRO = 4
LOCAL = 4  # examples per micro-batch per replica
BUCKET_MB = 0.0005  # 524 bytes: the MLP below splits into several buckets


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(MICRO, LOCAL, 8, generator=generator)
    return x, x.sum(dim=2, keepdim=True).sin()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int, no_sync: bool) -> None:
    for step in steps:
        x, y = data(step, rank)
        for micro in range(MICRO):
            loss = nn.functional.mse_loss(model(x[micro]), y[micro]) / MICRO
            if no_sync and micro < MICRO - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAILED {what}", flush=True)
        raise SystemExit(1)
    print(f"OK {what}", flush=True)


def replicas_equal(weights: torch.Tensor) -> bool:
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    return all(torch.equal(gathered[0], w) for w in gathered)


def one_process(steps: int, world: int) -> torch.Tensor:
    """The same steps in one process on the global batch (every replica's micro-batches)."""
    model, optimizer = build()
    for step in range(steps):
        for rank in range(world):
            x, y = data(step, rank)
            for micro in range(MICRO):
                (nn.functional.mse_loss(model(x[micro]), y[micro]) / MICRO / world).backward()
        optimizer.step()
        optimizer.zero_grad()
    return flat(model)


def accumulate() -> None:
    steps = 3
    for reducer in ("backend", "ring", "shm"):  # shm: the buckets in its shared memory (zero copy)
        for no_sync in (True, False):
            model, optimizer = build()
            model, optimizer = distlearn.parallelize(model, optimizer, reducer=reducer, bucket_mb=BUCKET_MB)
            strategy = optimizer.distlearn_strategy
            buckets = len(strategy.bucketer.buckets)
            if reducer == "shm":  # every bucket in the reducer's shared memory: its allreduce skips a copy
                shared = strategy.reducer._state(None, None).buffer_of
                pointers = [b.buffer.untyped_storage().data_ptr() for b in strategy.bucketer.buckets]
                check(all(p in shared for p in pointers), f"shm no_sync={no_sync}: buckets in shared memory")
            rank, world = strategy.rank, strategy.world_size
            train(model, optimizer, range(steps), rank, no_sync)
            ours = flat(model)
            strategy.close()
            reference = one_process(steps, world)
            torch_model, torch_optimizer = build()
            ddp = nn.parallel.DistributedDataParallel(torch_model, bucket_cap_mb=BUCKET_MB)
            train(ddp, torch_optimizer, range(steps), rank, no_sync)
            what = f"reducer={reducer} no_sync={no_sync} buckets={buckets}"
            check(buckets >= 3, f"{what}: three buckets or more")
            check(replicas_equal(ours), f"{what}: replicas equal")
            check(torch.allclose(ours, flat(torch_model), rtol=0, atol=1e-6), f"{what}: equals torch DDP")
            check(torch.allclose(ours, reference, rtol=0, atol=1e-6), f"{what}: equals one process")
    for codec in ("fp16", "topk"):  # fp16: no error feedback; topk: with it
        model, optimizer = build()
        options: dict[str, Any] = {"density": 0.25} if codec == "topk" else {}
        model, optimizer = distlearn.parallelize(
            model, optimizer, compression=codec, bucket_mb=BUCKET_MB, **options
        )
        train(model, optimizer, range(steps), optimizer.distlearn_strategy.rank, True)
        ours = flat(model)
        optimizer.distlearn_strategy.close()
        check(replicas_equal(ours), f"compression={codec}: replicas equal")
        if codec == "fp16":
            close = torch.allclose(ours, one_process(steps, dist.get_world_size()), rtol=0, atol=1e-3)
            check(close, "compression=fp16: within fp16 rounding of one process")


RESUMED = {
    "sync": {"bucket_mb": BUCKET_MB},
    "sync-topk": {"bucket_mb": BUCKET_MB, "compression": "topk", "density": 0.25},
    "sync-powersgd": {"bucket_mb": BUCKET_MB, "compression": "powersgd", "rank": 1},
    "local-sgd": {"average_every": 3},
    "easgd": {"easgd_mode": "sync", "elastic_tau": 2},
}


def parallel(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, optimizer = build()
    strategy = name if name in ("local-sgd", "easgd") else "sync"
    return distlearn.parallelize(model, optimizer, strategy, **RESUMED[name])


def resume(names: list[str]) -> None:
    total, cut = 5, 2
    for name in names:
        model, optimizer = parallel(name)
        rank = optimizer.distlearn_strategy.rank
        train(model, optimizer, range(total), rank, True)
        uninterrupted = flat(model)
        optimizer.distlearn_strategy.close()

        model, optimizer = parallel(name)
        train(model, optimizer, range(cut), rank, True)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        optimizer.distlearn_strategy.close()

        model, optimizer = parallel(name)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        check(saved["optimizer"]["distlearn"]["step"] == cut, f"{name}: the step count is saved")
        train(model, optimizer, range(cut, total), rank, True)
        resumed = flat(model)
        optimizer.distlearn_strategy.close()
        check(torch.equal(uninterrupted, resumed), f"{name}: resumed run equals the uninterrupted one")
        if name.startswith("sync"):  # local SGD and EASGD replicas differ between exchanges
            check(replicas_equal(resumed), f"{name}: replicas equal at the end")


PS = {
    "plain": {},
    "staleness-aware": {"staleness_aware": True},
    "softsync": {"softsync": 2},
    "backup-workers": {"backup_workers": 1},
    "local-steps": {"local_steps": 3},
}


def parameter_server(variant: str) -> None:
    """A ps variant, or ``easgd-async`` (rank 0 holds the centre): the same loop, the same checks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if variant == "easgd-async":
        model, optimizer = distlearn.parallelize(
            model, optimizer, "easgd", easgd_mode="async", comm_timeout=60
        )
    else:
        model, optimizer = distlearn.parallelize(model, optimizer, "ps", comm_timeout=60, **PS[variant])
    strategy = optimizer.distlearn_strategy  # a worker from here on: the server exited inside parallelize
    generator = torch.Generator().manual_seed(strategy.rank)
    losses = []
    for _ in range(60):
        x = torch.randn(16, 4, generator=generator)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = optimizer.state_dict()
    check(state["distlearn"]["step"] == 60, f"ps {variant}: the step count is in optimizer.state_dict()")
    try:
        optimizer.load_state_dict(state)
        check(False, f"ps {variant}: loading a ps state is refused")
    except ConfigError as error:
        check("server rank" in str(error), f"ps {variant}: loading a ps state is refused: {error}")
    strategy.close()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    check(last < first / 2, f"ps {variant}: rank {strategy.rank} loss {first:.4f} -> {last:.4f}")


def parameter_servers(variants: list[str]) -> None:
    """Each variant in turn on the same job's group. A server's parallelize() ends in SystemExit(0) (its
    whole life is serve()); caught here only to go on to the next variant: the one line rank 0 prints."""
    for variant in variants:
        try:
            parameter_server(variant)
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
            print(f"SERVER ps {variant}: exited 0 inside parallelize", flush=True)


def alone() -> None:
    check(not dist.is_initialized(), "no process group before parallelize")
    for strategy, options in (("sync", {"bucket_mb": BUCKET_MB}), ("local-sgd", {}), ("easgd", {})):
        model, optimizer = build()
        model, optimizer = distlearn.parallelize(model, optimizer, strategy, **options)
        check(optimizer.distlearn_strategy.world_size == 1, f"{strategy}: one process")
        train(model, optimizer, range(3), 0, True)
        ours = flat(model)
        optimizer.distlearn_strategy.close()
        check(not dist.is_initialized(), f"{strategy}: close() leaves the group it made")
        if strategy != "easgd":  # EASGD's elastic pull moves even one replica towards its centre
            check(torch.allclose(ours, one_process(3, 1), rtol=0, atol=1e-6), f"{strategy}: equals plain SGD")
    model, optimizer = build()
    try:
        distlearn.parallelize(model, optimizer, "ps")
        check(False, "ps under plain python is refused")
    except ConfigError as error:
        check("torchrun" in str(error), f"ps under plain python: {error}")
    check(not dist.is_initialized(), "ps refusal leaves no group")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "accumulate":
        accumulate()
    elif mode == "resume":
        resume(sys.argv[2].split(","))
    elif mode == "ps":
        parameter_servers(sys.argv[2].split(","))
    elif mode == "alone":
        alone()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if dist.is_initialized():
        dist.destroy_process_group()
