"""A worker of the sync failure tests: a stalled peer, or ranks that build different models.

    torchrun --nproc-per-node 2 sync_failure_worker.py MODE OUT      (MODE: stall | mismatch)

Each rank writes OUT/rank<k>.txt with the error it saw (type and message) or "ok".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

import distlearn
from distlearn.launch import init_distributed, shutdown


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    context = init_distributed(timeout_s=8)
    hidden = 16 if (mode == "mismatch" and context.rank == 1) else 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    report = out / f"rank{context.rank}.txt"
    try:
        model, optimizer = distlearn.parallelize(
            model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="sync", timeout_s=8
        )
        for step in range(5):
            if mode == "stall" and context.rank == 1 and step == 2:
                time.sleep(40)  # stops taking part; rank 0's allreduce must time out, not hang
                return 0
            x = torch.randn(8, 4)
            nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
            optimizer.step()
            optimizer.zero_grad()
        report.write_text("ok")
    except Exception as error:
        report.write_text(f"{type(error).__name__}: {error}")
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
