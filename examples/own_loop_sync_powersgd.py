"""Own loop, synchronous data parallelism with PowerSGD-compressed gradients; the replicas end equal.

Run it (plain ``python`` runs one process)::

    torchrun --nproc-per-node 2 examples/own_loop_sync_powersgd.py --steps 20
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import distlearn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = distlearn.parallelize(
        model, optimizer, strategy="sync", compression="powersgd", rank=2
    )
    strategy = optimizer.distlearn_strategy
    generator = torch.Generator().manual_seed(strategy.rank)  # each replica its own data
    for _ in range(args.steps):
        x = torch.randn(32, 16, generator=generator)
        loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(dim=1))
        loss.backward()
        optimizer.step()  # PowerSGD's averaged, compressed gradient
        optimizer.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(strategy.world_size)]
    dist.all_gather(copies, flat)
    equal = all(torch.equal(copy, flat) for copy in copies)
    print(f"rank {strategy.rank}: replicas equal: {equal}, last loss {loss.item():.4f}")
    strategy.close()
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
