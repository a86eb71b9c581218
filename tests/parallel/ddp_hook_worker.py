"""DDP with each of our reducers as its comm hook against DDP's own allreduce (run under torchrun).

    torchrun --nproc-per-node R ddp_hook_worker.py OUT
Rank 0 writes OUT/result.txt: one line per reducer with the max |difference| of the final weights.
tests/parallel/sync_worker.py calls :func:`compare_hooks` in its own job (``--ddp-hooks``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distlearn.comm.ddp_hooks import as_ddp_comm_hook
from distlearn.comm.reducers import REDUCERS, create_reducer
from distlearn.launch import init_distributed, shutdown


def run(rank: int, hook=None) -> torch.Tensor:
    torch.manual_seed(0)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)), bucket_cap_mb=0.001
    )
    if hook is not None:
        model.register_comm_hook(state=None, hook=hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # different data per rank, so averaging matters
    for _ in range(6):
        x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def compare_hooks(out: Path, rank: int) -> None:
    """DDP with each reducer as its hook against plain DDP, in the running job; rank 0 writes the result."""
    reference = run(rank)
    lines = []
    for name in REDUCERS:
        reducer = create_reducer(name, timeout_s=60)
        weights = run(rank, as_ddp_comm_hook(reducer))
        lines.append(f"{name} {float((weights - reference).abs().max()):.3e} {reducer.bytes_sent}")
        reducer.close()
    if rank == 0:
        (out / "result.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    out = Path(sys.argv[1])
    context = init_distributed(timeout_s=60)
    compare_hooks(out, context.rank)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
