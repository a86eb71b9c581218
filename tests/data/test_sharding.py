"""Sharding for R replicas with a fixed global batch B = R x M, as properties (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distlearn.errors import ConfigError
from distlearn.parallel.base import epoch_batches


def shards(n, replicas, local, seed, epoch, start_step=0):
    options = {"global_batch": replicas * local, "seed": seed, "epoch": epoch, "start_step": start_step}
    return [list(epoch_batches(n, rank=r, world_size=replicas, **options)) for r in range(replicas)]


settings_ = settings(max_examples=60, deadline=None)


@settings_
@given(
    n=st.integers(1, 300), replicas=st.integers(1, 6), local=st.integers(1, 20),
    seed=st.integers(0, 10**6), epoch=st.integers(0, 50),
)  # fmt: skip
def test_disjoint_covering_and_equal_to_one_process(n, replicas, local, seed, epoch):
    global_batch = replicas * local
    if global_batch > n:
        with pytest.raises(ConfigError, match="larger than"):
            shards(n, replicas, local, seed, epoch)
        return
    per_replica = shards(n, replicas, local, seed, epoch)
    single = list(epoch_batches(n, global_batch=global_batch, seed=seed, epoch=epoch))
    steps = n // global_batch
    assert all(len(batches) == steps for batches in per_replica)
    seen = torch.cat([b for batches in per_replica for b in batches])
    assert len(set(seen.tolist())) == len(seen) == steps * global_batch  # disjoint
    assert n - len(seen) == n % global_batch  # everything but the incomplete last batch is used
    for t in range(steps):  # the union of step t over replicas is the one-process batch of step t
        union = torch.cat([per_replica[r][t] for r in range(replicas)])
        assert torch.equal(union, single[t])
        assert all(len(per_replica[r][t]) == local for r in range(replicas))


@settings_
@given(n=st.integers(10, 200), seed=st.integers(0, 1000), epoch=st.integers(0, 20), start=st.integers(0, 9))
def test_deterministic_and_resumable(n, seed, epoch, start):
    first = shards(n, 2, 5, seed, epoch)
    assert all(torch.equal(a, b) for a, b in zip(first[0], shards(n, 2, 5, seed, epoch)[0], strict=True))
    resumed = shards(n, 2, 5, seed, epoch, start_step=start)
    assert all(torch.equal(a, b) for r in range(2) for a, b in zip(first[r][start:], resumed[r], strict=True))
    if n >= 20:  # another epoch is another order
        other = shards(n, 1, 10, seed, epoch + 1)[0]
        assert not all(
            torch.equal(a, b) for a, b in zip(shards(n, 1, 10, seed, epoch)[0], other, strict=True)
        )


def test_global_batch_not_divisible_by_replicas_is_an_error():
    with pytest.raises(ConfigError, match="not divisible by 3 replicas"):
        list(epoch_batches(100, global_batch=10, seed=0, epoch=0, rank=0, world_size=3))
