"""One worker of the byte-counting job (started by tests/parallel/test_bytes_counted.py under torchrun).

Trains the sync test's small problem for 12 steps with each strategy that allreduces (sync with gloo's
allreduce and with the ring reducer, DDP, local SGD, synchronous EASGD) and rank 0 saves each run's
``bytes_sent``, its exchange count, and the model's element count to OUT/bytes.json.

    python -m torch.distributed.run --nproc-per-node 3 tests/parallel/bytes_worker.py OUT
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_cases import config_for, synthetic_data  # noqa: E402

from distlearn.launch import init_distributed, shutdown  # noqa: E402
from distlearn.parallel.ddp import TorchDDP  # noqa: E402
from distlearn.parallel.easgd import ElasticAveraging  # noqa: E402
from distlearn.parallel.local_sgd import LocalSGD  # noqa: E402
from distlearn.parallel.sync import SyncDataParallel  # noqa: E402
from distlearn.train import train  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    context = init_distributed(timeout_s=60)
    train_set, test_set = synthetic_data()
    runs = [
        ("sync-backend", SyncDataParallel(timeout_s=60)),
        ("sync-ring", SyncDataParallel(reducer="ring", timeout_s=60)),
        ("ddp", TorchDDP(timeout_s=60)),
        ("local-sgd-k4", LocalSGD(period=4, timeout_s=60)),
        ("easgd-tau3", ElasticAveraging(mode="sync", tau=3, timeout_s=60)),
    ]
    record: dict[str, dict] = {}
    try:
        for label, strategy in runs:
            config = dataclasses.replace(config_for(out / f"run-{label}"), optimizer="sgd", lr=0.1)
            result = train(config, strategy=strategy, train_data=train_set, test_data=test_set)
            parameters = [p for p in result.model.parameters() if p.requires_grad]
            record[label] = {
                "bytes_sent": int(strategy.stats()["bytes_sent"]),
                "numel": sum(p.numel() for p in parameters),
                "tensors": len(parameters),
                "averages": getattr(strategy, "averages", None),
                "exchanges": getattr(strategy, "exchanges", None),
                "world_size": context.world_size,
            }
        if context.rank == 0:
            (out / "bytes.json").write_text(json.dumps(record, indent=1))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
