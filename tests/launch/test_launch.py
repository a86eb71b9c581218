"""The launcher: torchrun underneath, rendezvous from its environment, no process left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from distlearn.errors import CommError, ConfigError
from distlearn.launch import free_port, init_distributed, launch_local, torchrun_command

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, torch.distributed as dist
    from distlearn.launch import ENV_LAUNCHED, init_distributed, shutdown

    mode, out = sys.argv[1], sys.argv[2]
    context = init_distributed(timeout_s=float(sys.argv[3]) if len(sys.argv) > 3 else 30)
    with open(os.path.join(out, f"pid{context.rank}"), "w") as f:
        f.write(str(os.getpid()))
    if mode == "sum":
        value = torch.tensor([float(context.rank + 1)])
        dist.all_reduce(value)
        with open(os.path.join(out, f"rank{context.rank}.json"), "w") as f:
            json.dump({"rank": context.rank, "world": context.world_size, "sum": value.item(),
                       "launched": os.environ.get(ENV_LAUNCHED), "threads": os.environ["OMP_NUM_THREADS"]}, f)
    elif mode == "die":
        if context.rank == 1:
            os._exit(3)
        dist.barrier()  # never completes: rank 1 is gone
    elif mode == "hang":
        time.sleep(600)
    shutdown()
    """
)


@pytest.fixture
def worker_script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _pids(out) -> list[int]:
    texts = [p.read_text().strip() for p in out.glob("pid*")]
    return [int(text) for text in texts if text]  # a file being written may still be empty


@pytest.mark.parametrize("nproc", [1, 3])
def test_workers_rendezvous_and_allreduce(tmp_path, worker_script, nproc):
    code = launch_local([str(worker_script), "sum", str(tmp_path)], nproc, module=False, timeout_s=120)
    assert code == 0
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    expected = nproc * (nproc + 1) / 2  # sum of rank + 1 over ranks, worked by hand
    assert [r["sum"] for r in results] == [expected] * nproc
    assert {r["world"] for r in results} == {nproc}
    assert {r["launched"] for r in results} == {"1"}
    assert all(not _alive(pid) for pid in _pids(tmp_path))


def test_a_dying_worker_ends_the_job_with_an_error_and_no_orphans(tmp_path, worker_script):
    start = time.monotonic()
    code = launch_local([str(worker_script), "die", str(tmp_path), "20"], 2, module=False, timeout_s=120)
    assert code != 0
    assert time.monotonic() - start < 90
    time.sleep(0.5)
    assert all(not _alive(pid) for pid in _pids(tmp_path))


def test_deadline_stops_every_process(tmp_path, worker_script):
    with pytest.raises(CommError, match="did not finish within"):
        launch_local([str(worker_script), "hang", str(tmp_path)], 2, module=False, timeout_s=15)
    time.sleep(0.5)
    pids = _pids(tmp_path)
    assert len(pids) == 2
    assert all(not _alive(pid) for pid in pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminating_the_launcher_stops_every_process_of_the_job(tmp_path, worker_script, signum):
    """`timeout`, `kill` or a closed terminal reach the launcher only; the job runs in its own session."""
    parent = textwrap.dedent(
        f"""
        import sys
        from distlearn.launch import launch_local
        launch_local([{str(worker_script)!r}, "hang", {str(tmp_path)!r}], 2, module=False, timeout_s=300)
        """
    )
    launcher = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 120
    while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = _pids(tmp_path)
    assert len(pids) == 2, "the workers did not start"
    launcher.send_signal(signum)
    assert launcher.wait(timeout=60) == 128 + signum
    time.sleep(0.5)
    assert all(not _alive(pid) for pid in pids)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            launch_local(["distlearn", "--version"], 1, port=port)


def test_outside_torchrun_the_error_names_the_fix(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="--workers N"):
        init_distributed()


def test_command_line_shape():
    command = torchrun_command(["distlearn", "train"], 2, port=29999)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--rdzv-endpoint") + 1] == "127.0.0.1:29999"
    assert command[command.index("--max-restarts") + 1] == "0"
    assert command[-3:] == ["-m", "distlearn", "train"]
    with pytest.raises(ConfigError, match="at least one worker"):
        torchrun_command(["distlearn"], 0)
    assert 0 < free_port() < 65536
