"""The hierarchical reducer on real torchrun jobs: 2 nodes x 2 ranks, 1 x 2 and 2 x 1 on 127.0.0.1.

Two "nodes" are two torchrun agents on this machine with distinct node ranks (as
tests/launch/test_multinode.py): they share /dev/shm, but the shm reducer's segments are named per job,
rank and process, so the two hosts' segments do not collide. Every case is checked bitwise against gloo's
``dist.all_reduce`` and the exact sum. The 2 x 2 job then loses its last rank (one start of its four ranks
and two agents for both tests; a module fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distlearn.comm.reducers import create_reducer
from distlearn.comm.reducers.hierarchical import host_layout
from distlearn.errors import ConfigError
from distlearn.launch import free_port

WORKER = Path(__file__).with_name("hierarchical_worker.py")


def _launch(tmp_path: Path, nodes: int, per_node: int, *args: str) -> list[int]:
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(nodes),
                "--nproc-per-node",
                str(per_node),
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                f"hier-{nodes}x{per_node}",
                "--max-restarts",
                "0",
                str(WORKER),
                str(tmp_path),
                *args,
            ],
            env=env,
            start_new_session=True,
        )  # fmt: skip
        for node in range(nodes)
    ]
    try:
        return [agent.wait(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, 9)
                agent.wait()


DIE_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """``jobs(nodes, per_node)``: the job's output directory, run once per module; the 2 x 2 job also runs
    the dying-rank case after its checks (``die{rank}.json``)."""
    done: dict[tuple[int, int], Path] = {}

    def get(nodes: int, per_node: int) -> Path:
        if (nodes, per_node) not in done:
            out = tmp_path_factory.mktemp(f"hier-{nodes}x{per_node}")
            args = ("then-die", str(DIE_TIMEOUT_S)) if (nodes, per_node) == (2, 2) else ()
            assert _launch(out, nodes, per_node, *args) == [0] * nodes
            done[nodes, per_node] = out
        return done[nodes, per_node]

    return get


def _run(tmp_path: Path, nodes: int, per_node: int) -> list[dict]:
    results = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in results] == list(range(nodes * per_node))
    for result in results:
        assert result["failures"] == [], "\n".join(result["failures"])
        assert result["cases"] >= 40
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nodes, per_node", [(2, 2), (1, 2), (2, 1)])
def test_hierarchical_matches_gloo_allreduce(jobs, nodes, per_node):
    results = _run(jobs(nodes, per_node), nodes, per_node)
    world = nodes * per_node
    hosts = [list(range(h * per_node, (h + 1) * per_node)) for h in range(nodes)]
    for result in results:
        assert result["hosts"] == hosts  # torchrun's layout: node-major blocks
        assert result["local"] == result["rank"] % per_node == result["local_rank"]
    # bytes: over all ranks 2 (R - 1) n, as every bandwidth-optimal allreduce (1000 float32 elements);
    # across hosts only the inner ring's 2 (H - 1) n / L per rank
    assert sum(r["bytes_sent"] for r in results) == 2 * (world - 1) * 1000 * 4
    for result in results:
        expected_inter = 2 * (nodes - 1) * (1000 // per_node) * 4 // nodes
        assert result["inter_host_bytes"] == expected_inter
    if nodes == 1:
        assert all(r["inter_host_bytes"] == 0 for r in results)


@pytest.mark.timeout(300)
def test_a_rank_that_dies_gives_every_other_rank_a_comm_error_within_the_deadline(jobs):
    timeout_s = DIE_TIMEOUT_S
    out = jobs(2, 2)  # after its checks, the 2 x 2 job's last rank left
    results = sorted((json.loads(p.read_text()) for p in out.glob("die*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1, 2]  # rank 3 left
    for result in results:
        assert result["type"] == "CommError", result
        assert result["error"].startswith(f"hierarchical allreduce: rank {result['rank']} "), result
        assert result["seconds"] < 2 * timeout_s + 5, result
    # rank 2 shares a host with rank 3: the shared-memory step sees the dead process at once and names it
    # (rank 1 of the host's group, which is rank 3 of the job)
    error = results[2]["error"]
    assert error.startswith(
        "hierarchical allreduce: rank 2 in the intra-host reduce-scatter (its ranks 0, 1 are "
    )
    assert "ranks 2, 3 here)" in error and "rank 1 (pid" in error and results[2]["seconds"] < 5, error


def test_host_layout_groups_ranks_by_node_and_refuses_unequal_hosts():
    # (node id, LOCAL_RANK, LOCAL_WORLD_SIZE) per rank; node-major or interleaved, hosts come in rank order
    assert host_layout([(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]) == ((0, 1), (2, 3))
    assert host_layout([(0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2)]) == ((0, 2), (1, 3))
    assert host_layout([(5, -1, -1)] * 3) == ((0, 1, 2),)
    with pytest.raises(
        ConfigError, match=r"different numbers of ranks \(node 0: 2, node 1: 1\).*--nproc-per-node"
    ):
        host_layout([(0, 0, 2), (0, 1, 2), (1, 0, 1)])
    with pytest.raises(ConfigError, match="repeated LOCAL_RANK.*same --node-rank"):
        host_layout([(0, 0, 2), (0, 0, 2)])


def test_hierarchical_options_are_checked():
    reducer = create_reducer("hierarchical", inner="tree", timeout_s=5)
    assert reducer.name == "hierarchical" and reducer.inner.name == "tree" and reducer.timeout_s == 5
    with pytest.raises(ConfigError, match="unknown inner reducer 'shm'; choose one of: ring, tree"):
        create_reducer("hierarchical", inner="shm")
    with pytest.raises(ConfigError, match="does not take segment_bytes"):
        create_reducer("hierarchical", segment_bytes=4096)


def test_auto_picks_shm_on_the_cpu_of_a_one_host_job_else_the_backend(monkeypatch):
    from distlearn.comm.reducers.auto import resolve_reducer
    from distlearn.parallel.sync import SyncOptions

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_reducer("auto", torch.device("cpu")) == "shm"
    assert resolve_reducer("auto", "cuda:0") == "backend"  # NCCL's own allreduce on GPUs
    assert resolve_reducer("ring", "cuda:0") == "ring"  # a concrete name is kept
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of 2
    assert resolve_reducer("auto", "cpu") == "backend"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # no torchrun: nothing says where the ranks are
    assert resolve_reducer("auto", "cpu") == "backend"
    SyncOptions(reducer="auto").validate()
    SyncOptions(reducer="auto", compression="fp16").validate()  # auto leaves the codec its exchange
    with pytest.raises(ConfigError, match="cannot be combined with --compression"):
        SyncOptions(reducer="shm", compression="fp16").validate()
    # the shared-memory reducers are for CPU tensors: --device cuda is refused before any process starts
    from distlearn.parallel.ddp import DDPOptions

    assert "--reducer shm moves CPU tensors" in SyncOptions(reducer="shm").cuda_refusal()
    assert "--comm-hook hierarchical moves CPU" in DDPOptions(comm_hook="hierarchical").cuda_refusal()
    assert SyncOptions(reducer="auto").cuda_refusal() == DDPOptions(comm_hook="ring").cuda_refusal() == ""
