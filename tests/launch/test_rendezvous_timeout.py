"""Every rendezvous honours --comm-timeout: a port held by a program that accepts and never answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distlearn.launch import torchrun_command

SRC = str(Path(__file__).resolve().parents[2] / "src")

WORKER = """
import json, sys, time
from distlearn.errors import CommError
from distlearn.launch import init_distributed
started = time.monotonic()
try:
    init_distributed(timeout_s=3)
    outcome = {"error": None}
except CommError as error:
    outcome = {"error": str(error)}
outcome["seconds"] = time.monotonic() - started
print(json.dumps(outcome), flush=True)
"""


@pytest.fixture
def silent_listener():
    """A port held by a listener that accepts every connection and never sends a byte."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for connection in held:
        connection.close()
    server.close()


@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_fails_within_its_comm_timeout_when_the_port_never_answers(silent_listener, rank):
    env = dict(
        os.environ, PYTHONPATH=SRC, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(silent_listener), OMP_NUM_THREADS="1",
    )  # fmt: skip
    started = time.monotonic()
    command = [sys.executable, "-c", WORKER]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    print(f"rank {rank}: process ended in {time.monotonic() - started:.1f} s; {done.stdout.strip()}")
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] is not None, "joined a job on a port that never answers"
    assert outcome["seconds"] <= 6.0  # --comm-timeout 3
    assert f"rank {rank}: " in outcome["error"] and f"127.0.0.1:{silent_listener}" in outcome["error"]
    if rank == 0:  # rank 0 hosts the store: it cannot listen there, and knows at once (measured 0.02 s)
        assert "the port is held by another program" in outcome["error"]
    else:  # rank 1 connects, and the handshake never comes back: the deadline (measured 3.0 s)
        assert outcome["seconds"] >= 2.9
        assert "did not answer within 3 s" in outcome["error"]
        assert "held by another program that accepts connections" in outcome["error"]
    assert done.returncode == 0  # the stuck handshake did not keep the process from ending


def test_torchrun_s_own_rendezvous_gets_the_comm_timeout():
    command = torchrun_command(["distlearn", "train"], 2, rdzv_timeout_s=2.5, max_restarts=3)
    assert command[command.index("--rdzv-conf") + 1] == "join_timeout=3,read_timeout=3"
    assert command[command.index("--max-restarts") + 1] == "3"
    assert "--rdzv-conf" not in torchrun_command(["distlearn", "train"], 2)


def test_distlearn_train_s_comm_timeout_bounds_its_rendezvous(silent_listener, tmp_path):
    env = dict(
        os.environ, PYTHONPATH=SRC, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(silent_listener), OMP_NUM_THREADS="1",
    )  # fmt: skip
    command = [
        sys.executable, "-m", "distlearn", "train", "--strategy", "sync", "--workers", "2", "--model", "mlp",
        "--comm-timeout", "3", "--out", str(tmp_path / "run"), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("distlearn train: error:")]
    assert len(lines) == 1 and "did not answer within 3 s" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
