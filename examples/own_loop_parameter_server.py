"""Own loop on a staleness-aware parameter server: rank 0 serves, the other ranks train; the loss falls.

Run it (rank 0 is the server; with 3 processes two workers push asynchronously)::

    torchrun --nproc-per-node 2 examples/own_loop_parameter_server.py --steps 60

``parallelize`` never returns on a server rank: it serves until every worker has closed its strategy and
then the process exits. Each worker's ``optimizer.step()`` pushes its gradient and pulls the weights.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import distlearn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = distlearn.parallelize(model, optimizer, strategy="ps", staleness_aware=True)
    strategy = optimizer.distlearn_strategy  # from here on this is a worker rank
    generator = torch.Generator().manual_seed(strategy.rank)
    losses = []
    for _ in range(args.steps):
        x = torch.randn(16, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()  # push the gradient, pull the servers' weights
        optimizer.zero_grad()
        losses.append(loss.item())
    strategy.close()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"rank {strategy.rank}: loss {first:.4f} -> {last:.4f}")
    if not last < first / 2:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
