"""``python -m distlearn.dni.cli``: a model-parallel run, one stage per process (DNI, cDNI or backprop).

Run manual::

    python -m distlearn.dni.cli --dataset mnist --data-root ../shared/data --stages 3 --epochs 2
    python -m distlearn.dni.cli ... --cdni                 # conditioned synthetic gradients
    python -m distlearn.dni.cli ... --mode backprop        # the same ranks, waiting for true gradients
    distlearn train --strategy dni --stages 3 [--cdni]    # the same through the trainer's CLI
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-endpoint HOST:PORT -m distlearn.dni.cli --stages 4 ...

Outside torchrun it starts ``--stages`` processes under torchrun on 127.0.0.1 (the resolved config travels
as ``OUT/dni.toml``); inside, each process runs its stage (:func:`distlearn.dni.pipeline.run_pipeline`).
Rank 0 writes ``OUT/metrics.jsonl`` (the trainer's records: the top rank's training records, eval, summary)
and ``OUT/summary.json``; the top rank also writes its training records to ``OUT/metrics.rank<K-1>.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distlearn.config import parse, to_toml
from distlearn.dni.pipeline import DNIConfig, run_pipeline
from distlearn.errors import DistlearnError
from distlearn.launch import in_torchrun, init_distributed, launch_local, shutdown

__all__ = ["launch", "main", "run_rank"]


def run_rank(config: DNIConfig) -> dict:
    """Join the torchrun job and run this rank's stage; leaves the job afterwards."""
    context = init_distributed(timeout_s=config.timeout_s)
    try:
        return run_pipeline(config, rank=context.rank, world_size=context.world_size)
    finally:
        shutdown()


def launch(config: DNIConfig, *, timeout_s: float | None = None) -> int:
    """Start ``config.stages`` processes of this module under torchrun on 127.0.0.1; their exit code."""
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dni.toml"
    path.write_text(to_toml(config))
    return launch_local(
        ["distlearn.dni.cli", "--config", str(path)], config.stages, timeout_s=timeout_s, threads_per_worker=1
    )


def main(argv: list[str] | None = None) -> int:
    try:
        prog, description = "python -m distlearn.dni.cli", __doc__.splitlines()[0]
        config = parse(DNIConfig, argv, prog=prog, description=description)
        if not in_torchrun():
            return launch(config)
        run_rank(config)
    except DistlearnError as error:
        print(f"distlearn dni: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
