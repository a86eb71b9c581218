"""The parameter-server core (distlearn.comm.paramserver): shard plan, staleness book, a real 3-process run.

The shard plan and the staleness bookkeeping are checked against sequences worked by hand; the serving
loop, the push/pull protocol and the shared-memory path against a real job of three processes on
127.0.0.1 (tests/comm/paramserver_job.py) whose server adds every push to its state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from distlearn.comm.paramserver import StalenessBook, shard_numels, shard_parameters
from distlearn.comm.shm import SharedBlock
from distlearn.errors import ConfigError
from ranks import run_ranks

JOB = str(Path(__file__).resolve().parent / "paramserver_job.py")


def test_shard_plan_matches_a_hand_worked_lpt_schedule():
    # sizes 5, 5, 4, 3, 3 largest first: 5 -> s0, 5 -> s1, 4 -> s2, 3 -> s2 (loads 5, 5, 4), 3 -> s0 (5, 5, 7)
    plan = shard_parameters([5, 5, 4, 3, 3], 3)
    assert plan == [[0, 4], [1], [2, 3]]
    assert shard_numels([5, 5, 4, 3, 3], plan) == [8, 5, 7]
    assert shard_parameters([7], 2) == [[0], []] and shard_numels([7], [[0], []]) == [7, 0]
    with pytest.raises(ConfigError, match="at least one server"):
        shard_parameters([1], 0)


def test_staleness_book_follows_a_hand_worked_sequence_of_pushes_and_pulls():
    book = StalenessBook()
    # workers 1, 2, 3 pull version 0; 1 pushes (tau 0 -> v1), 2 pushes (tau 1 -> v2), then 1 pulls v2 ...
    assert book.staleness(0) == 0
    book.received()
    book.applied([(1, book.staleness(0))])
    book.received()
    book.applied([(2, book.staleness(0))])
    # ... a group of two (n-softsync): worker 3 (on v0, tau 2) and worker 1 (on v2, tau 0): one version
    book.received()
    book.received()
    book.applied([(1, book.staleness(2)), (3, book.staleness(0))])
    # worker 2 (on v1) is late at v3: a backup-worker server drops it
    book.received()
    assert book.is_late(1) and not book.is_late(3)
    book.drop(1)
    assert book.updates == [[0, 1, 0], [1, 2, 1], [2, 1, 0], [2, 3, 2]]
    summary = book.summary()
    assert summary["version"] == 3 and summary["pushes"] == 5 and summary["applied"] == 4
    assert summary["dropped"] == 1 and summary["dropped_per_version"] == {"1": 1}
    assert summary["mean_staleness"] == 3 / 4 and summary["max_staleness"] == 2
    again = StalenessBook()
    again.load(book.state())  # a checkpoint round trip: the count goes on from the saved version
    assert again.summary() == {**summary, "resumed_from": 3}
    counts = StalenessBook(keep_updates=False)
    counts.applied([(1, 4)])
    assert counts.updates == [] and counts.summary()["mean_staleness"] == 4


@pytest.mark.timeout(120)
@pytest.mark.skipif(not SharedBlock.name(1, "x").parent.is_dir(), reason="no /dev/shm here")
def test_serving_loop_protocol_and_shared_memory_in_a_three_process_job(tmp_path):
    codes = run_ranks([sys.executable, JOB, str(tmp_path)], 3, tmp_path, timeout=100)
    logs = "\n".join((tmp_path / f"log{r}.txt").read_text()[-2000:] for r in range(3))
    assert codes == [0, 0, 0], logs
    server, one, two = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3))
    # hand-worked: s0 = rank 1's INIT values; pushes 1/0 (+10 on v0), 2/0 (+20 on v0), 1/1 (+11 on v1),
    # 2/1 (+21 on v2), applied at versions 0, 1, 2, 3
    s0 = torch.arange(5, dtype=torch.float32)
    assert server["updates"] == [[0, 1, 0], [1, 2, 1], [2, 1, 1], [3, 2, 1]] and server["pushes"] == 4
    assert torch.equal(server["state"], s0 + 62)
    expected_one = [(0, 0.0, s0), (1, 0.0, s0 + 10), (3, 1.0, s0 + 41)]
    expected_two = [(0, 0.0, s0), (2, 1.0, s0 + 30), (4, 1.0, s0 + 62)]
    for seen, expected in ((one["seen"], expected_one), (two["seen"], expected_two)):
        assert [(v, s) for v, s, _ in seen] == [(v, s) for v, s, _ in expected]
        for (_, _, got), (_, _, want) in zip(seen, expected, strict=True):
            assert torch.equal(got, want)
    # rank 1's payloads after its INIT went through shared memory (2 pushes and 2 replies of 5 floats)
    assert one["accepted"] and not two["accepted"]
    assert one["shared_bytes"] == server["shared_bytes"] == 4 * 4 * 5 and two["shared_bytes"] == 0
    # rank 1 said DONE; rank 2 went silent and was found silent (its heartbeat changed nothing); the server
    # ended with a receive still posted to it (and exited 0: the codes above)
    assert server["done"] == [1] and server["dead"] == [2] and server["lost"] == [2]
    assert server["silences"] == 1 and server["why"] == ["silent"]
