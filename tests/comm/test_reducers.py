"""Allreduce algorithms against gloo's own allreduce, on torchrun workers over 127.0.0.1.

One torchrun job per world size (1, 2, 3, 4) runs every algorithm on many lengths and dtypes, unbatched
and (R >= 2) in batched rounds (tests/comm/reducer_worker.py); the bytes each rank sent are checked here
against the formulas, worked out independently of the implementation. The job runs once per session
(tests/comm/conftest.py: test_shm_reducer.py reads its shm cases from the same job). Failure jobs: a peer
that leaves (one job: every algorithm unbatched, then batched), a peer that never calls (one job per
algorithm: a timeout breaks the group).
"""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
from comm_jobs import run_reducer_job as _run

from distlearn.comm.reducers import REDUCERS, chunk_bounds, create_reducer
from distlearn.errors import CommError, ConfigError


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """``jobs(world, *args)``: the ranks' results of that job and its seconds, run once per module (the first
    test that asks starts it, the others read the same results)."""
    done: dict[tuple, tuple[list[dict], float]] = {}

    def get(world: int, *args: str, timeout_s: float = 150) -> tuple[list[dict], float]:
        key = (world, *args)
        if key not in done:
            start = time.monotonic()
            results = _run(tmp_path_factory.mktemp(f"{args[0]}-{world}"), world, *args, timeout_s=timeout_s)
            done[key] = (results, time.monotonic() - start)
        return done[key]

    return get


def _mode_results(correctness_job, world: int, mode: str) -> list[dict]:
    """Each rank's results of ``mode`` (check, batched) from the session's job of ``world`` ranks."""
    _, results = correctness_job(world)
    for result in results:
        assert result["failures"] == [], "\n".join(result["failures"])
    return [result[mode] for result in results]


# ---- bytes each rank sends, worked from the algorithms' definitions -------------------------------------


def ring_elements(rank: int, world: int, n: int) -> int:
    """Reduce-scatter step s sends chunk r-s; all-gather step s sends chunk r+1-s (mod p); p-1 steps each."""
    sizes = [n // world + (1 if i < n % world else 0) for i in range(world)]
    return sum(sizes[(rank - s) % world] + sizes[(rank + 1 - s) % world] for s in range(world - 1))


def tree_elements(rank: int, world: int, n: int) -> int:
    """Every non-root sends n once up the tree; every rank sends n to each child r + 2^k (2^k below its
    lowest set bit, any 2^k for the root) in the broadcast."""
    lowbit = rank & -rank if rank else 1 << world.bit_length()
    children = sum(1 for k in range(world.bit_length()) if (1 << k) < lowbit and rank + (1 << k) < world)
    return n * (rank != 0) + n * children


def rabenseifner_elements(rank: int, world: int, n: int) -> int:
    """Pre/post fold steps send the whole vector; halving sends the halves given away, doubling the halves
    kept (blocks of n/p', sizes differing by at most one)."""
    active = 1 << (world.bit_length() - 1)
    extra = world - active
    if rank < 2 * extra and rank % 2 == 0:
        return n
    virtual = rank // 2 if rank < 2 * extra else rank - extra
    blocks = [n // active + (1 if i < n % active else 0) for i in range(active)]
    sent, low, high, mask = 0, 0, active, active // 2
    while mask:
        middle = (low + high) // 2
        give, keep = ((low, middle), (middle, high)) if virtual & mask else ((middle, high), (low, middle))
        sent += sum(blocks[give[0] : give[1]]) + sum(blocks[keep[0] : keep[1]])  # halving + doubling
        low, high = keep
        mask //= 2
    return sent + (n if rank < 2 * extra else 0)


def shm_elements(rank: int, world: int, n: int) -> int:
    """shm (and hierarchical on one host): the peers read this rank's input outside its own chunk, and its
    reduced chunk once each: (n - n_r) + (p - 1) n_r."""
    start, stop = chunk_bounds(n, world)[rank]
    return (n - (stop - start)) + (world - 1) * (stop - start)


FORMULAS = {
    "ring": ring_elements,
    "segmented-ring": ring_elements,
    "tree": tree_elements,
    "rabenseifner": rabenseifner_elements,
    "backend": lambda rank, world, n: 2 * (world - 1) * n // world,  # nominal: gloo's ring
    "shm": shm_elements,
    "hierarchical": shm_elements,  # one host (launch_local): the shm allreduce alone
}

# worked by hand for n = 1000 float32 (bytes): p = 3 -> ring chunks 334, 333, 333; p' = 2 with one folded pair
BY_HAND = {
    3: {
        "ring": [4 * (334 + 333 + 333 + 334), 4 * (333 + 334 + 333 + 333), 4 * (333 + 333 + 334 + 333)],
        "tree": [4 * 2000, 4 * 1000, 4 * 1000],  # rank 0: broadcast to 2 and 1; ranks 1, 2: reduce only
        "rabenseifner": [4 * 1000, 4 * (500 + 500 + 1000), 4 * (500 + 500)],
    },
    4: {
        "ring": [4 * 1500] * 4,
        "tree": [4 * 2000, 4 * 1000, 4 * 2000, 4 * 1000],  # rank 2 sends to 3 in the broadcast
        "rabenseifner": [4 * (500 + 250 + 250 + 500)] * 4,
    },
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_algorithm_matches_gloo_allreduce(correctness_job, world):
    results = _mode_results(correctness_job, world, "check")
    for result in results:
        assert result["failures"] == [], "\n".join(result["failures"])
        assert result["cases"] > 60
    for name in REDUCERS:
        for n in (1000, 5, 1):
            sent = [result["bytes"][name][str(n)] for result in results]
            expected = [4 * FORMULAS[name](rank, world, n) for rank in range(world)]
            assert sent == expected, (name, n)
            if name != "backend":  # every element is sent 2(p-1) times in all (plus the folds)
                extra = world - (1 << (world.bit_length() - 1)) if name == "rabenseifner" else 0
                total = (
                    2 * (world - 1) * n
                    if name != "rabenseifner"
                    else 2 * (world - 1 - extra) * n + 2 * extra * n
                )
                assert sum(sent) == 4 * total, (name, n)
        if name in ("ring", "segmented-ring") and world > 1:  # 2(p-1)/p n per rank, up to chunk rounding
            for rank in range(world):
                elements = results[rank]["bytes"][name]["1000"] // 4
                assert abs(elements - 2 * (world - 1) * 1000 / world) <= 2 * (world - 1)
    for name, per_rank in BY_HAND.get(world, {}).items():
        assert [result["bytes"][name]["1000"] for result in results] == per_rank, name
    if world == 1:
        assert all(
            result["bytes"][name]["1000"] == 0 for result in results for name in REDUCERS if name != "backend"
        )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_batched_rounds_match_gloo_allreduce_and_the_unbatched_algorithm(correctness_job, world):
    """The NCCL path (one batch_isend_irecv per round), forced on gloo: exact for integer values, bitwise the
    unbatched algorithm's sums, the same bytes sent as the unbatched path and as the formulas."""
    results = _mode_results(correctness_job, world, "batched")
    for result in results:
        assert result["failures"] == [], "\n".join(result["failures"])
        assert result["cases"] >= 42
    for name in REDUCERS:
        if not REDUCERS[name].point_to_point:  # backend, shm, hierarchical: no rounds of messages
            continue
        for n in (1000, 5, 1):
            batched = [result["bytes"][f"{name} batched=True n={n}"] for result in results]
            plain = [result["bytes"][f"{name} batched=False n={n}"] for result in results]
            expected = [4 * FORMULAS[name](rank, world, n) for rank in range(world)]
            assert batched == plain == expected, (name, n)


def test_batched_rounds_are_chosen_for_nccl_and_can_be_forced(monkeypatch):
    from distlearn.comm.reducers import Message

    ring = create_reducer("ring")
    assert ring.batched is None and not ring._batched_for(torch.ones(3), None)  # automatic: CUDA on NCCL only
    assert create_reducer("ring", batched=False)._batched_for(torch.ones(3), None) is False
    assert create_reducer("tree", batched=True)._batched_for(torch.ones(3), None) is True
    assert create_reducer("tree", batched=True).batched is True
    with pytest.raises(ConfigError, match="batched must be true, false or None"):
        create_reducer("ring", batched="yes")
    monkeypatch.setenv("DISTLEARN_BATCHED_P2P", "1")  # None then means batched, on any backend
    assert ring._batched_for(torch.ones(3), None) is True
    assert create_reducer("ring", batched=False)._batched_for(torch.ones(3), None) is False
    message = Message(True, torch.ones(2), 1, "chunk 0")
    assert message.sending and message.then is None


@pytest.mark.parametrize("mode", ["", "batched"])
def test_a_peer_that_leaves_gives_comm_error_for_every_algorithm(jobs, mode):
    timeout_s = 20
    results, seconds = jobs(2, "die", str(timeout_s), "both")  # one job: unbatched, then batched rounds
    assert seconds < 60
    assert results[0]["failures"] == [], "\n".join(results[0]["failures"])
    errors = results[0]["errors batched" if mode else "errors"]
    assert set(errors) == set(REDUCERS)
    for name, error in errors.items():
        assert error["error"] and not error.get("wrong_type"), error
        assert error["error"].startswith(f"{name} allreduce: rank 0 ")
        assert "peer may have died" in error["error"]
        assert error["seconds"] < timeout_s
    if mode:  # a round's messages are waited in order: the first one posted, the send, reports
        pattern = r"(receiving chunk 1|sending chunk 0) \(reduce-scatter step 0\) (from|to) rank 1"
        assert re.search(pattern, errors["ring"]["error"])
    else:
        assert "receiving chunk 1 (reduce-scatter step 0) from rank 1" in errors["ring"]["error"]


@pytest.mark.parametrize("name, mode", [("ring", ""), ("rabenseifner", ""), ("tree", "batched")])
def test_a_peer_that_never_calls_times_out_with_a_clear_error(tmp_path, name, mode):
    results = _run(tmp_path, 2, "hang", "2", name, *([mode] if mode else []))
    error = results[0]["errors"][name]
    assert not error.get("wrong_type"), error
    # gloo completes a send only once the receiver has posted its receive, so either side can time out
    assert re.match(
        rf"{name} allreduce: rank 0 timed out after 2 s (receiving .* from|sending .* to) rank 1; ",
        error["error"],
    )
    assert 1.9 < error["seconds"] < 10


# ---- in-process checks (no process group needed) ---------------------------------------------------------


@pytest.mark.parametrize("n, parts", [(0, 3), (1, 4), (7, 3), (10, 5), (1001, 4), (3, 8)])
def test_chunk_bounds_cover_the_vector_with_sizes_differing_by_at_most_one(n, parts):
    bounds = chunk_bounds(n, parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert sizes == [len(c) for c in torch.arange(n).tensor_split(parts)]


def test_create_reducer_names_the_choices_and_checks_options():
    assert list(REDUCERS) == [
        "backend", "ring", "tree", "rabenseifner", "segmented-ring", "shm", "hierarchical"
    ]  # fmt: skip
    for name in REDUCERS:
        reducer = create_reducer(name, timeout_s=5)
        assert reducer.name == name and reducer.bytes_sent == 0 and reducer.timeout_s == 5
    assert create_reducer("segmented-ring", segment_bytes=4096).segment_bytes == 4096
    with pytest.raises(
        ConfigError, match="choose one of: backend, ring, tree, rabenseifner, segmented-ring, shm"
    ):
        create_reducer("butterfly")
    with pytest.raises(
        ConfigError, match="does not take segment_bytes; its options are: timeout_s, tag, duplex, batched"
    ):
        create_reducer("ring", segment_bytes=1024)
    with pytest.raises(ConfigError, match="segment_bytes must be a positive integer"):
        create_reducer("segmented-ring", segment_bytes=0)
    with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
        create_reducer("tree", timeout_s=-1)


def test_bad_input_and_missing_process_group_are_clear_errors():
    reducer = create_reducer("ring")
    with pytest.raises(ConfigError, match="expected a torch.Tensor"):
        reducer.allreduce_([1.0, 2.0])
    with pytest.raises(ConfigError, match="dtype torch.bool is not supported"):
        reducer.allreduce_(torch.ones(3, dtype=torch.bool))
    with pytest.raises(CommError, match="no process group; call distlearn.launch.init_distributed"):
        reducer.allreduce_(torch.ones(3))
    future = reducer.allreduce_async(torch.ones(3))
    with pytest.raises(CommError, match="no process group"):
        future.wait()
    reducer.close()
    assert math.isclose(reducer.timeout_s, 60.0)
