"""MPI_Allreduce through mpi4py, timed as ``benchmarks/allreduce_busbw.py`` times distlearn's reducers: the
peer a CPU user would pick instead (issue 23), measured in the same run.

``allreduce_busbw.py`` starts this script under the ``mpiexec`` of the MPI library that mpi4py loads (the
``mpich`` wheel of ``pip install -e '.[mpi]'`` ships both), on 127.0.0.1 only, in blocks between its own
torchrun blocks. By hand::

    mpiexec -launcher fork -hosts 127.0.0.1 -n 2 python benchmarks/mpi_allreduce.py \\
        --sizes 4096 1048576 --trials 5 --out FILE.json

Trial (the same definition as the torchrun side): a float32 buffer of ``size`` bytes; after a barrier,
``iterations(size)`` back-to-back ``MPI_Allreduce(MPI_IN_PLACE, SUM)`` calls; the trial's time per call is
the slowest rank's (an ``MPI_MAX`` allreduce of each rank's). ``--warmup`` untimed trials first. Rank 0
writes ``{"library", "world_size", "seconds": {size: [seconds per call, one per trial]}}`` to ``--out``.

Only the standard library at import time: ``allreduce_busbw.py`` imports :func:`iterations` from here, and
mpi4py (with numpy) is imported when the script runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def iterations(nbytes: int) -> int:
    """Calls per trial: enough that a trial of small messages lasts well above the timer's resolution."""
    return max(1, min(50, (16 << 20) // max(1, nbytes)))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="message sizes in bytes")
    parser.add_argument("--trials", type=int, default=5, help="timed trials per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed trials first")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    seconds: dict[str, list[float]] = {}
    for nbytes in args.sizes:
        buffer = np.ones(nbytes // 4, dtype=np.float32)
        iters = iterations(nbytes)
        samples = []
        for trial in range(args.warmup + args.trials):
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(iters):
                comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            elapsed = (time.perf_counter() - start) / iters
            slowest = comm.allreduce(elapsed, op=MPI.MAX)  # a trial lasts as long as its slowest rank
            if trial >= args.warmup:
                samples.append(slowest)
        seconds[str(nbytes)] = samples
    if comm.Get_rank() == 0:
        record = {
            "library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
            "mpi4py": __import__("mpi4py").__version__,
            "world_size": comm.Get_size(),
            "seconds": seconds,
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
