"""The alpha-beta-gamma formulas against numbers worked by hand, and the fit recovering known costs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distlearn.comm.cost_model import (
    ALGORITHMS,
    Measurement,
    Network,
    bus_bandwidth,
    coefficients,
    fit,
    link,
    memory,
    project,
)
from distlearn.comm.reducers import REDUCERS
from distlearn.errors import ConfigError

NET = Network("hand", alpha=1e-5, beta=1e-9, gamma=1e-10)


def test_the_model_knows_every_reducer():
    assert set(ALGORITHMS) == set(REDUCERS)


def test_ring_worked_by_hand():
    # p = 4, n = 1e6 bytes: 2*3*1e-5 + 2*3/4*1e6*1e-9 + 3/4*1e6*1e-10 = 6e-5 + 1.5e-3 + 7.5e-5
    assert project("ring", 4, 1e6, NET) == pytest.approx(6e-5 + 1.5e-3 + 7.5e-5, rel=1e-12)
    assert project("backend", 4, 1e6, NET) == project("ring", 4, 1e6, NET)
    # p = 3: 4e-5 + 4/3 * 1e-3 + 2/3 * 1e-4
    assert project("ring", 3, 1e6, NET) == pytest.approx(4e-5 + 4 / 3 * 1e-3 + 2 / 3 * 1e-4, rel=1e-12)


def test_tree_worked_by_hand():
    # p = 8: lg p = 3 -> 6 (1e-5 + 1e-3) + 3e-4 = 6.06e-3 + 3e-4
    assert project("tree", 8, 1e6, NET) == pytest.approx(6 * (1e-5 + 1e-3) + 3e-4, rel=1e-12)
    # p = 5: ceil(lg 5) = 3 rounds, as for 8
    assert project("tree", 5, 1e6, NET) == project("tree", 8, 1e6, NET)
    # pipelined: p = 2, n = 8 MiB in 1 MiB segments -> s = 8, L = 1: 9 (alpha + n/8 beta) + n/8 gamma
    n = 8 * 2**20
    expected = 9 * (1e-5 + n / 8 * 1e-9) + n / 8 * 1e-10
    assert project("tree", 2, n, NET, tree_segment_bytes=2**20) == pytest.approx(expected, rel=1e-12)
    # ... tends to the ring's n beta at p = 2 as segments multiply; unsegmented it is 2 n beta
    assert coefficients("tree", 2, n, tree_segment_bytes=1024)[1] == pytest.approx(n, rel=1e-3)
    assert coefficients("tree", 2, n, tree_segment_bytes=None)[1] == 2 * n
    # p = 8: the root sends 3 copies of each of s = 8 segments: 3 (8 + 1) messages on the critical path
    assert coefficients("tree", 8, n, tree_segment_bytes=2**20)[0] == 27


def test_rabenseifner_worked_by_hand():
    # p = 8: 2*3*1e-5 + 2*7/8*1e-3 + 7/8*1e-4
    assert project("rabenseifner", 8, 1e6, NET) == pytest.approx(6e-5 + 1.75e-3 + 8.75e-5, rel=1e-12)
    # p = 6 = 4 + 2: the p' = 4 formula (4e-5 + 1.5e-3 + 7.5e-5) plus fold steps 2(1e-5 + 1e-3) + 1e-4
    expected = 4e-5 + 1.5e-3 + 7.5e-5 + 2 * (1e-5 + 1e-3) + 1e-4
    assert project("rabenseifner", 6, 1e6, NET) == pytest.approx(expected, rel=1e-12)


def test_segmented_ring_worked_by_hand():
    # p = 4, n = 8 MB, 1 MB segments: chunk 2 MB -> s = 2 segments: (6 + 1) alpha, same beta, gamma / 2
    n = 8 * 2**20
    expected = 7e-5 + 1.5 * n * 1e-9 + 0.75 * n * 1e-10 / 2
    assert project("segmented-ring", 4, n, NET, segment_bytes=2**20) == pytest.approx(expected, rel=1e-12)
    # one segment per chunk is the ring
    assert project("segmented-ring", 4, 1e6, NET, segment_bytes=2**30) == project("ring", 4, 1e6, NET)


def test_limits_and_orderings():
    for name in ALGORITHMS:
        assert project(name, 1, 1e6, NET) == 0 and project(name, 8, 0, NET) == 0
    # large messages: bandwidth-optimal algorithms beat the tree; tiny ones: log p latencies beat 2(p-1)
    assert project("ring", 64, 1e8, NET) < project("tree", 64, 1e8, NET)
    assert project("rabenseifner", 64, 8, NET) < project("ring", 64, 8, NET)
    # the ring's bandwidth term tends to 2 n beta as p grows
    assert coefficients("ring", 1024, 1.0)[1] == pytest.approx(2.0, rel=1e-3)


def test_link_and_bus_bandwidth():
    ten = link(10, alpha=5e-6)
    assert ten.beta == pytest.approx(8e-10) and ten.bandwidth_GBps == pytest.approx(1.25)
    assert bus_bandwidth(1e6, 1e-3, 2) == pytest.approx(1e9)  # algbw 1 GB/s, factor 2(2-1)/2 = 1
    assert bus_bandwidth(1e6, 1e-3, 4) == pytest.approx(1.5e9)
    with pytest.raises(ConfigError, match="choose one of"):
        project("butterfly", 4, 1e6, NET)
    with pytest.raises(ConfigError, match="positive integer"):
        project("ring", 0, 1e6, NET)
    with pytest.raises(ConfigError, match="gbps > 0"):
        link(0, alpha=1e-6)


def synthetic(alpha: float, beta: float, gamma: float, noise: float = 0.0) -> list[Measurement]:
    rng = np.random.default_rng(0)
    points = []
    for name in ("ring", "tree", "rabenseifner"):
        for p in (2, 3, 4):
            for nbytes in (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20):
                seconds = project(name, p, nbytes, Network("truth", alpha, beta, gamma))
                points.append(Measurement(name, p, nbytes, seconds * (1 + noise * rng.standard_normal())))
    return points


def test_fit_recovers_known_alpha_and_beta():
    alpha, beta, gamma = 4e-5, 7e-10, 2e-10
    result = fit(synthetic(alpha, beta, gamma), gamma=gamma)
    assert result.alpha == pytest.approx(alpha, rel=1e-8)
    assert result.beta == pytest.approx(beta, rel=1e-8)
    assert result.rms_relative_error < 1e-10 and result.points == 45
    # tuples work too, and the absolute-error fit agrees on exact data
    tuples = [(m.algorithm, m.p, m.nbytes, m.seconds) for m in synthetic(alpha, beta, gamma)]
    assert fit(tuples, gamma=gamma, relative=False).beta == pytest.approx(beta, rel=1e-6)


def test_fit_with_noise_is_close():
    alpha, beta = 3e-5, 1e-9
    result = fit(synthetic(alpha, beta, 0.0, noise=0.05))
    assert result.alpha == pytest.approx(alpha, rel=0.1)
    assert result.beta == pytest.approx(beta, rel=0.05)
    assert 0.02 < result.rms_relative_error < 0.1


def test_fit_never_returns_negative_costs_and_rejects_too_little_data():
    # pure bandwidth data (alpha = 0) with noise could pull alpha below zero: it is clamped
    points = [
        Measurement("ring", 2, n, n * 1e-9 * (1 + 0.01 * (-1) ** i)) for i, n in enumerate([1e3, 1e6, 1e8])
    ]
    result = fit(points)
    assert result.alpha >= 0 and result.beta == pytest.approx(1e-9, rel=0.05)
    with pytest.raises(ConfigError, match="at least two measurements"):
        fit([Measurement("ring", 2, 1e6, 1e-3)])
    with pytest.raises(ConfigError, match="at least two different message sizes"):
        fit([Measurement("ring", 2, 1e6, 1e-3), Measurement("ring", 2, 1e6, 1.1e-3)])
    assert math.isfinite(result.rms_relative_error)


# ---- the shared-memory and hierarchical terms ------------------------------------------------------------

MEM = Network("memory by hand", alpha=1e-6, beta=1e-10)  # 10 GB/s copies, 1 us per flag


def test_shm_is_memory_bound_worked_by_hand():
    # p = 2, n = 4e5 bytes: chunks of 2e5, one piece each (2 MiB by default); copy the other chunk in
    # (n/2), sum (read 2 chunks, write slot and tensor: 4 x n/2 read+written = n copied), copy the other sum
    # back (n/2): 2 n beta + 3 flag waits
    n = 4e5
    expected = 3 * 1e-6 + 2.0 * n * 1e-10
    assert project("shm", 2, n, NET, memory_network=MEM) == pytest.approx(expected, rel=1e-12)
    # zero copy (the bucket in a shared_buffer): read 2 chunks in place, write 1 (3/4 n), copy back (n/2)
    assert coefficients("shm", 2, n, zero_copy=True) == (3.0, 1.25 * n, 0.0)
    # p = 4, 3 MiB: chunks of 768 KiB in 3 pieces of 256 KiB, 9 flag waits; 3/4 + 6/8 + 3/4 = 2.25 n
    n = 3 * 2**20
    assert coefficients("shm", 4, n, shm_piece_bytes=2**18) == pytest.approx((9.0, 2.25 * n, 0.0), rel=1e-12)
    assert coefficients("shm", 4, n)[0] == 3.0  # one 2 MiB piece per chunk
    # the network does not enter: the ranks share memory
    slow = Network("slow", alpha=1.0, beta=1.0)
    assert project("shm", 4, n, slow, memory_network=MEM) == project("shm", 4, n, NET, memory_network=MEM)
    assert coefficients("shm", 1, n) == coefficients("shm", 4, 0) == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="shm_piece_bytes must be positive"):
        coefficients("shm", 2, 10, shm_piece_bytes=0)


def test_memory_network_from_a_copy_rate():
    mem = memory(20.0, sync_s=3e-6)
    assert mem.beta == pytest.approx(1 / 20e9) and mem.alpha == 3e-6
    assert mem.bandwidth_GBps == pytest.approx(20)
    # the default: the measured 15.3 GB/s single-core copy
    assert memory().bandwidth_GBps == pytest.approx(15.3)
    with pytest.raises(ConfigError, match="copy_gbps > 0"):
        memory(0)


def test_hierarchical_is_shm_within_hosts_plus_inner_across_worked_by_hand():
    n = 8e6
    # p = 8 as 4 hosts x 2 ranks: shm at p = 2 on n (2 n beta_mem + 3 alpha_mem per 2 MiB piece of a chunk)
    # plus a ring on 4 hosts of n / 2: 2*3 alpha + 2*3/4 * n/2 beta + 3/4 * n/2 gamma
    pieces = math.ceil(n / 2 / 2**21)
    memory_part = 3 * pieces * 1e-6 + 2.0 * n * 1e-10
    network_part = 6 * 1e-5 + 1.5 * (n / 2) * 1e-9 + 0.75 * (n / 2) * 1e-10
    got = project("hierarchical", 8, n, NET, memory_network=MEM, local_size=2)
    assert got == pytest.approx(memory_part + network_part, rel=1e-12)
    # coefficients give the network part alone
    assert coefficients("hierarchical", 8, n, local_size=2) == coefficients("ring", 4, n / 2)
    # another inner algorithm
    tree = project("hierarchical", 8, n, NET, memory_network=MEM, local_size=2, inner="tree")
    assert tree == pytest.approx(memory_part + project("tree", 4, n / 2, NET), rel=1e-12)
    # one rank per host: the inner reducer alone; one host: shm alone
    assert project("hierarchical", 8, n, NET, memory_network=MEM) == project("ring", 8, n, NET)
    assert project("hierarchical", 8, n, NET, memory_network=MEM, local_size=8) == project(
        "shm", 8, n, NET, memory_network=MEM
    )
    # fewer bytes cross the network than with a flat ring over every rank: n/L per local rank
    assert coefficients("hierarchical", 8, n, local_size=2)[1] < coefficients("ring", 8, n)[1]
    with pytest.raises(ConfigError, match="positive divisor of p = 8"):
        coefficients("hierarchical", 8, n, local_size=3)
    with pytest.raises(ConfigError, match="unknown inner algorithm"):
        coefficients("hierarchical", 8, n, local_size=2, inner="shm")
