"""``distlearn live --demo``: which strategies it starts, and that every process it started is stopped.

The stopping test starts real ``distlearn train`` jobs on Fashion-MNIST (a budget too large to finish) and
ends them as a person does: Ctrl-C in the terminal (closing the page ends nothing: test_hardening.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distlearn.data import find_dataset
from distlearn.errors import ConfigError
from distlearn.live.demo import (
    DEFAULT_STRATEGIES,
    DemoBudget,
    DemoLauncher,
    _alive,
    demo_strategies,
    descendants,
)
from distlearn.parallel import STRATEGIES

pytestmark = pytest.mark.timeout(120)

# Enough steps that no run finishes before the test stops it; small data so that it starts quickly.
ENDLESS = {"steps": 100_000, "train_samples": 512, "test_samples": 128, "log_every": 1, "eval_every": 10_000}


def fashion_mnist_or_skip() -> None:
    if find_dataset("fashion-mnist") is None:  # never download in a test
        pytest.skip("Fashion-MNIST is not installed here (make install: Debian's dataset-fashion-mnist)")


def test_default_strategies_are_sync_ps_and_hogwild_those_registered():
    assert demo_strategies() == [name for name in ("sync", "ps", "hogwild") if name in STRATEGIES]
    assert demo_strategies("default") == demo_strategies()
    assert set(DEFAULT_STRATEGIES) == {"sync", "ps", "hogwild"}
    assert demo_strategies("all") == list(STRATEGIES)
    assert demo_strategies(" ps, sync ,ps") == ["ps", "sync"]
    with pytest.raises(ConfigError, match="unknown demo strategy 'nope'"):
        demo_strategies("sync,nope")


def test_every_run_gets_the_same_budget_in_its_own_directory(tmp_path):
    launcher = DemoLauncher(tmp_path, ["sync", "ps"], DemoBudget(steps=40), python="python3")
    assert launcher.runs() == [("sync", tmp_path / "sync"), ("ps", tmp_path / "ps")]
    commands = [status["command"].split() for status in launcher.status()]
    own = {"--strategy", "--workers", "--out", "--name"}  # the flags that differ between runs, and values

    def shared(command: list[str]) -> list[str]:
        return [word for i, word in enumerate(command) if word not in own and command[i - 1] not in own]

    assert shared(commands[0]) == shared(commands[1])  # the same work; only the strategy and processes differ
    assert commands[1][commands[1].index("--workers") + 1] == "3"  # ps: one server rank, two workers
    assert "--steps" in commands[0] and commands[0][commands[0].index("--steps") + 1] == "40"
    assert [s["state"] for s in launcher.status()] == ["waiting", "waiting"]
    with pytest.raises(ConfigError, match="demo steps must be positive"):
        DemoBudget(steps=0).flags()


def wait_for_training(run_dir: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        time.sleep(0.2)
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    raise AssertionError(f"{run_dir.name} wrote no records within {timeout} s; its log:\n{log}")


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_every_process_of_the_demo(tmp_path):
    fashion_mnist_or_skip()
    out = tmp_path / "demo"
    flags = ["--steps", str(ENDLESS["steps"]), "--strategies", "sync", "--out", str(out), "--poll", "0.1"]
    # its own session, so that the SIGINT below reaches only the command, as a terminal's Ctrl-C would
    # reach only the foreground job (the demo's runs run in sessions of their own)
    cli = subprocess.Popen(
        [sys.executable, "-m", "distlearn", "live", "--demo", *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # as a terminal's foreground job: SIGINT at its default even if pytest was started ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    tree: list[int] = []
    try:
        wait_for_training(out / "sync")
        tree = descendants(cli.pid)
        # distlearn train, the torchrun it launched, and torchrun's two workers
        assert len(tree) >= 4, tree
        cli.send_signal(signal.SIGINT)
        output, _ = cli.communicate(timeout=40)
        assert cli.returncode == 130, output
        assert "stopping the demo's runs" in output
        assert [pid for pid in tree if _alive(pid)] == []
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        for pid in tree:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
