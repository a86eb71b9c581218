"""One worker of the 2-process compression test (started by tests/comm/test_compression.py under torchrun).

For "none" and every codec: (1) train a small MLP for a few steps with the sync strategy and that codec,
check that both ranks end with identical weights and record the bytes sent; (2) reduce one bucket through
the codec's real exchange (allreduce or all-gather) and compare it with a local re-enactment: each rank's
payload encoded by a fresh codec in that rank's context, decoded and summed (PowerSGD: its two power-iteration
allreduces written out); (3) count the host synchronisations of one more bucket's exchange
(:func:`distlearn.comm.syncs.count_syncs`). Rank 0 writes OUT/result.txt:
``name equal|differ bytes_sent exchange_error syncs``.

    python -m torch.distributed.run --nproc-per-node 2 tests/comm/compression_worker.py OUT
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

from sync_cases import config_for, synthetic_data  # noqa: E402

from distlearn.comm.compression import (  # noqa: E402
    COMPRESSORS,
    BucketContext,
    CompressedReducer,
    Exchange,
    create_compressor,
    reduce_bucket,
    stream_seed,
)
from distlearn.comm.compression.powersgd import _orthogonalise  # noqa: E402
from distlearn.comm.syncs import count_syncs  # noqa: E402
from distlearn.launch import init_distributed, shutdown  # noqa: E402
from distlearn.parallel.sync import SyncDataParallel  # noqa: E402
from distlearn.train import train  # noqa: E402

SHAPES = [(20, 30), (20,), (8, 3, 3, 3)]
NUMEL = sum(math.prod(s) for s in SHAPES)
OPTIONS = {"threshold": {"threshold": 0.05}, "topk": {"density": 0.01}, "randomk": {"density": 0.05},
           "dgc": {"density": 0.01}, "powersgd": {"rank": 2}}  # fmt: skip


def bucket_of(rank: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 + rank))


def reenact(name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The sum every rank should receive, computed locally from every rank's input."""
    if name == "powersgd":
        probe = create_compressor(name, **OPTIONS[name])
        start, total = 0, torch.zeros(NUMEL)
        for index, (shape, entry) in enumerate(zip(SHAPES, probe.plan(SHAPES), strict=True)):
            stop = start + math.prod(shape)
            if entry is None:
                total[start:stop] = sum(x[start:stop] for x in inputs)
            else:
                n, m, r = entry
                q = probe.initial_q(0, "0", index, 0, m, r)
                p = _orthogonalise(sum(x[start:stop].view(n, m) @ q for x in inputs))
                q_sum = sum(x[start:stop].view(n, m).T @ p for x in inputs)
                total[start:stop] = (p @ q_sum.T).reshape(-1)
            start = stop
        return total
    total = torch.zeros(NUMEL)
    for rank, x in enumerate(inputs):
        codec = create_compressor(name, **OPTIONS.get(name, {}))
        context = BucketContext("0", SHAPES, world_size=len(inputs), seed=0, stream_seed=stream_seed(0, rank))
        total += codec.decode(codec.encode(x.clone(), context), context)
    return total


def ddp_run(rank: int, hook=None) -> torch.Tensor:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)))
    if hook is not None:
        model.register_comm_hook(state=None, hook=hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(4):
        x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ddp_hook_line(rank: int) -> str:
    """DDP with top-k at density 1 (lossless) as our comm hook must equal DDP's own allreduce."""
    from distlearn.comm.ddp_hooks import compression_ddp_comm_hook

    reference = ddp_run(rank)
    hook = compression_ddp_comm_hook(create_compressor("topk", density=1.0))
    weights = ddp_run(rank, hook)
    return f"ddp-hook equal {hook.exchange.bytes_sent} {float((weights - reference).abs().max()):.3e}"


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    train_set, test_set = synthetic_data()
    lines = []
    try:
        for name in ["none", *COMPRESSORS]:
            options = OPTIONS.get(name, {})
            strategy = SyncDataParallel(
                compression=name, compression_options=options if name != "none" else None, timeout_s=60
            )
            config = config_for(out / f"run-{name}")
            config.steps = 6
            if name == "dgc":
                config.optimizer = "sgd"  # DGC's momentum correction replaces the optimizer's momentum
            result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
            flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(context.world_size)]
            dist.all_gather(gathered, flat)
            equal = all(torch.equal(other, flat) for other in gathered)
            sent = strategy.stats()["bytes_sent"]

            error, syncs = 0.0, ""
            if name != "none":
                codec = create_compressor(name, **options)
                reducer = CompressedReducer(codec, seed=0, timeout_s=60)
                mine = bucket_of(context.rank)
                reducer.register(mine, "0", SHAPES)
                received = reducer.allreduce_async(mine).wait()
                expected = reenact(name, [bucket_of(r) for r in range(context.world_size)])
                error = float((received - expected).abs().max() / expected.abs().max())
                reducer.close()
                counted = create_compressor(name, **options)  # in this thread: the count is per thread
                context_of = BucketContext("0", SHAPES, world_size=context.world_size, seed=0,
                                                    stream_seed=stream_seed(0, context.rank))  # fmt: skip
                reduce_bucket(counted, bucket_of(context.rank), context_of, Exchange(timeout_s=60))
                with count_syncs() as counter:
                    reduce_bucket(counted, bucket_of(context.rank) * 2, context_of, Exchange(timeout_s=60))
                syncs = f" {counter.count}"
            lines.append(f"{name} {'equal' if equal else 'differ'} {sent} {error:.3e}{syncs}")
        lines.append(ddp_hook_line(context.rank))
    finally:
        shutdown()
    if context.rank == 0:
        (out / "result.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
