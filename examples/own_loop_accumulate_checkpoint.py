"""Own loop: gradient accumulation with ``no_sync()``, an error-feedback codec, checkpoint and resume.

Run it (one machine, two processes; or plain ``python`` for one)::

    torchrun --nproc-per-node 2 examples/own_loop_accumulate_checkpoint.py --steps 6 --resume-at 3

It trains an MLP of several gradient buckets with ``sync`` + top-k (error feedback) over three
micro-batches per step, saves ``model.state_dict()`` and ``optimizer.state_dict()`` (which holds the
residuals) after ``--resume-at`` steps, starts a fresh model and optimizer from that file, finishes the run,
and checks that the resumed weights equal an uninterrupted run's bitwise.
"""

from __future__ import annotations

import argparse
import io
import os

import torch
import torch.distributed as dist
from torch import nn

import distlearn

MICRO_BATCHES = 3


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    # bucket_mb small enough for several buckets; topk keeps an error-feedback residual per bucket
    return distlearn.parallelize(model, optimizer, strategy="sync", bucket_mb=0.01, compression="topk",
                                 density=0.1)  # fmt: skip


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(1000 * step + rank)  # this replica's data of the step
        x = torch.randn(MICRO_BATCHES, 4, 8, generator=generator)
        y = x.sum(dim=2, keepdim=True).sin()
        for micro in range(MICRO_BATCHES):
            loss = nn.functional.mse_loss(model(x[micro]), y[micro]) / MICRO_BATCHES
            if micro < MICRO_BATCHES - 1:
                with model.no_sync():  # accumulate locally, no communication
                    loss.backward()
            else:
                loss.backward()  # this one reduces the accumulated gradient
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume-at", type=int, default=3)
    args = parser.parse_args()
    if "RANK" in os.environ:  # the script owns the job's group: the three parallelize() calls below share it
        dist.init_process_group("gloo")

    model, optimizer = build()
    rank = optimizer.distlearn_strategy.rank
    train(model, optimizer, range(args.steps), rank)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    optimizer.distlearn_strategy.close()

    model, optimizer = build()
    train(model, optimizer, range(args.resume_at), rank)
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    optimizer.distlearn_strategy.close()

    model, optimizer = build()  # a fresh start, as after a restart
    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train(model, optimizer, range(args.resume_at, args.steps), rank)
    resumed = [p.detach() for p in model.parameters()]
    optimizer.distlearn_strategy.close()

    equal = all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))
    print(f"rank {rank}: resumed run equals the uninterrupted one: {equal}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
