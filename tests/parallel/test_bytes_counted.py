"""Bytes sent follow one rule across strategies (distlearn.comm.traffic; docs/benchmarks.md, "How bytes
are counted"): an allreduce of ``n`` bytes sends ``2 (R - 1) / R n`` from each rank, whether a strategy
reduces gradients every step (sync, DDP) or parameters now and then (local SGD, synchronous EASGD).

A real 3-worker torchrun job (R = 3, where ``2 (R - 1) / R = 4/3`` tells the rule from counting ``n``)
trains the same MLP for 12 steps with each strategy; the counts are checked against the formula computed
here by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distlearn.comm.traffic import ring_allgather_bytes, ring_allreduce_bytes
from distlearn.launch import launch_local

WORKER = str(Path(__file__).resolve().parent / "bytes_worker.py")
STEPS = 12
R = 3


def test_the_ring_formulas_by_hand():
    assert ring_allreduce_bytes(300, 4, 3) == 2 * 2 * 100 * 4  # 2 (R - 1) chunks of n / R
    assert ring_allreduce_bytes(10, 4, 3) == (40 // 3) * 4  # whole elements
    assert ring_allreduce_bytes(10, 4, 2) == 40  # R = 2: the bytes themselves
    assert ring_allreduce_bytes(10, 4, 1) == 0
    assert ring_allgather_bytes(100, 4) == 300 and ring_allgather_bytes(100, 1) == 0


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bytes")
    code = launch_local([WORKER, str(out)], R, module=False, timeout_s=240)
    assert code == 0, f"the {R}-worker byte-counting job failed (exit {code}); its output is above"
    return json.loads((out / "bytes.json").read_text())


@pytest.mark.timeout(300)
def test_every_allreducing_strategy_counts_two_r_minus_one_over_r_of_the_bytes_it_reduces(counts):
    n = counts["sync-backend"]["numel"]
    assert all(run["numel"] == n and run["world_size"] == R for run in counts.values())
    per_allreduce = 2 * (R - 1) * n * 4 / R  # float32 parameters, bytes one rank sends
    # every step: the whole gradient (in buckets, each rounded down to whole elements, at most one per
    # tensor; the ring reducer's chunks are whole elements too)
    slack = 4 * counts["sync-backend"]["tensors"] * STEPS
    for label in ("sync-backend", "sync-ring", "ddp"):
        assert abs(counts[label]["bytes_sent"] - STEPS * per_allreduce) <= slack, (label, counts[label])
    # now and then: the parameters as one flat tensor, 3 averages (after steps 4, 8, 12) and 4 elastic
    # exchanges (at steps 0, 3, 6, 9)
    local, elastic = counts["local-sgd-k4"], counts["easgd-tau3"]
    assert local["averages"] == 3 and elastic["exchanges"] == 4
    assert local["bytes_sent"] == 3 * (2 * (R - 1) * n // R) * 4
    assert elastic["bytes_sent"] == 4 * (2 * (R - 1) * n // R) * 4
    # the ratio of two strategies is that of their allreduces (counting n per average gave 3/16 here)
    assert local["bytes_sent"] / counts["ddp"]["bytes_sent"] == pytest.approx(3 / STEPS, rel=1e-3)
