"""Two torchrun "nodes" on 127.0.0.1 (``--nnodes 2``, distinct node ranks): the many-machine path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from distlearn.launch import free_port

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from distlearn.launch import init_distributed, shutdown

    context = init_distributed(timeout_s=30)
    value = torch.tensor([float(context.rank + 1)])
    dist.all_reduce(value)
    record = {"rank": context.rank, "world": context.world_size, "local_rank": context.local_rank,
              "node": int(os.environ["GROUP_RANK"]), "sum": value.item()}
    with open(os.path.join(sys.argv[1], f"rank{context.rank}.json"), "w") as f:
        json.dump(record, f)
    shutdown()
    """
)


def test_two_nodes_on_loopback_form_one_job(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "multinode-test",
                "--max-restarts",
                "0",
                str(script),
                str(tmp_path),
            ],
            env=env,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    try:
        codes = [node.wait(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
    assert codes == [0, 0]
    records = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    assert {r["world"] for r in records} == {4}
    assert {r["sum"] for r in records} == {1.0 + 2.0 + 3.0 + 4.0}
    # two distinct nodes, each with local ranks 0 and 1
    assert sorted((r["node"], r["local_rank"]) for r in records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
