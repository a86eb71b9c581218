"""One rank of a DNI test job (started by tests/dni/test_dni_pipeline.py, one process per rank).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p LOCAL_RANK=0 python dni_worker.py A.toml B.toml

Runs each config in turn on one process group (so one job start-up serves several cases).
"""

from __future__ import annotations

import sys

from distlearn.config import load_toml
from distlearn.dni.pipeline import DNIConfig, run_pipeline
from distlearn.launch import init_distributed, shutdown

if __name__ == "__main__":
    context = init_distributed(timeout_s=60)
    try:
        for path in sys.argv[1:]:
            run_pipeline(load_toml(DNIConfig, path), rank=context.rank, world_size=context.world_size)
    finally:
        shutdown()
