"""Synchronous data parallelism equals one process with the same global batch (the overview's claim).

R replicas with global batch B, for K steps, end with the weights of one process with batch B (float32,
max abs difference under 1e-5), for R = 1..4, with every reduction algorithm, with and without buckets
and overlap. Runs real torchrun jobs on 127.0.0.1: one per R, which for R = 2 and 3 also runs the DDP
comm-hook comparison (module fixture; each test asserts on its part).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_cases import CASES, config_for, synthetic_data  # noqa: E402

from distlearn.comm.reducers import REDUCERS  # noqa: E402
from distlearn.errors import ConfigError  # noqa: E402
from distlearn.launch import launch_local  # noqa: E402
from distlearn.parallel import SingleProcess, create_strategy  # noqa: E402
from distlearn.train import train  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "sync_worker.py")


@pytest.fixture(scope="module")
def single_process_weights(tmp_path_factory) -> torch.Tensor:
    train_set, test_set = synthetic_data()
    out = tmp_path_factory.mktemp("single")
    result = train(config_for(out), strategy=SingleProcess(), train_data=train_set, test_data=test_set)
    return torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])


HOOK_REPLICAS = (2, 3)  # the world sizes whose job also compares our reducers as DDP comm hooks


@pytest.fixture(scope="module")
def sync_jobs(tmp_path_factory):
    """``sync_jobs(R)``: the output directory of the R-worker job, run once per module (every reducer and
    bucketing case, and for R in HOOK_REPLICAS the DDP comm-hook comparison)."""
    done: dict[int, Path] = {}

    def get(replicas: int) -> Path:
        if replicas not in done:
            out = tmp_path_factory.mktemp(f"sync-{replicas}")
            command = [WORKER, str(out), ",".join(REDUCERS)]
            command += ["--ddp-hooks"] if replicas in HOOK_REPLICAS else []
            code = launch_local(command, replicas, module=False, timeout_s=300)
            assert code == 0, f"the {replicas}-worker job failed (exit {code}); its output is above"
            done[replicas] = out
        return done[replicas]

    return get


@pytest.mark.timeout(360)
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_sync_equals_one_process_with_the_global_batch(sync_jobs, replicas, single_process_weights):
    reducers = list(REDUCERS)
    tmp_path = sync_jobs(replicas)
    start = torch.cat([p.detach().reshape(-1) for p in _initial_model().parameters()])
    assert (single_process_weights - start).abs().max() > 1e-3  # training moved the weights
    for reducer in reducers:
        for label, _, _ in CASES:
            saved = torch.load(tmp_path / f"{reducer}-{label}.pt", weights_only=True)
            difference = float((saved["weights"] - single_process_weights).abs().max())
            assert difference < 1e-5, f"R={replicas} {reducer} {label}: max |difference| {difference:.2e}"
            if replicas == 1:
                assert saved["bytes_sent"] == 0
            else:
                assert saved["bytes_sent"] > 0


def _initial_model():
    from distlearn.models import create_model

    torch.manual_seed(0)
    return create_model("mlp", in_channels=1, num_classes=4, image_size=10)


def test_sync_outside_a_job_says_how_to_start_one():
    strategy = create_strategy("sync")
    with pytest.raises(ConfigError, match="--workers N"):
        strategy.setup(0)


def test_bad_sync_settings_are_rejected():
    with pytest.raises(ConfigError, match="unknown"):
        create_strategy("sync", reducer="butterfly")
    with pytest.raises(ConfigError, match="bucket-mb"):
        create_strategy("sync", bucket_mb=-1)


@pytest.mark.timeout(240)
def test_two_torchrun_nodes_train_like_one_process(tmp_path, single_process_weights):
    """The many-machine path: two torchrun "nodes" on 127.0.0.1 (--nnodes 2, node ranks 0 and 1)."""
    import os
    import subprocess

    from distlearn.launch import free_port

    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sync-nodes",
        "--max-restarts", "0",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*command, "--node-rank", str(node), WORKER, str(tmp_path), "backend,ring,hierarchical"],
            env=env,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    try:
        codes = [node.wait(timeout=200) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
    assert codes == [0, 0]
    for reducer in ("backend", "ring", "hierarchical"):  # hierarchical: one rank per node, its inner ring
        for label, _, _ in CASES:
            saved = torch.load(tmp_path / f"{reducer}-{label}.pt", weights_only=True)
            assert float((saved["weights"] - single_process_weights).abs().max()) < 1e-5


FAILURE_WORKER = str(Path(__file__).resolve().parent / "sync_failure_worker.py")


@pytest.mark.timeout(120)
def test_a_stalled_peer_raises_a_comm_error_naming_the_rank_within_the_timeout(tmp_path):
    import time

    started = time.monotonic()
    code = launch_local([FAILURE_WORKER, "stall", str(tmp_path)], 2, module=False, timeout_s=100)
    elapsed = time.monotonic() - started
    assert code != 0
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("CommError: ") and "rank 0" in message, message
    assert elapsed < 40, f"the job took {elapsed:.0f} s: the 8 s timeout did not end it"


@pytest.mark.timeout(120)
def test_ranks_with_different_models_are_stopped_at_start(tmp_path):
    code = launch_local([FAILURE_WORKER, "mismatch", str(tmp_path)], 2, module=False, timeout_s=100)
    assert code != 0
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("ConfigError: ") and "hold different models" in message, message


@pytest.mark.timeout(360)
@pytest.mark.parametrize("replicas", HOOK_REPLICAS)
def test_our_reducers_as_ddp_comm_hooks_match_ddp(sync_jobs, replicas):
    results = [line.split() for line in (sync_jobs(replicas) / "result.txt").read_text().splitlines()]
    assert [name for name, _, _ in results] == list(REDUCERS)
    for name, difference, sent in results:
        assert float(difference) < 1e-6, f"{name}: DDP with our hook differs by {difference}"
        assert int(sent) > 0
