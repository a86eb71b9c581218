"""The examples/ scripts at a tiny size, as two plain processes (the ranks torchrun would start)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ranks import run_ranks

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.timeout(180)
def test_accumulation_checkpoint_resume_equals_the_uninterrupted_run(tmp_path):
    script = [sys.executable, str(EXAMPLES / "own_loop_accumulate_checkpoint.py"), "--steps", "4"]
    codes = run_ranks([*script, "--resume-at", "2"], 2, tmp_path, timeout=150)
    logs = [(tmp_path / f"log{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    assert all("equals the uninterrupted one: True" in log for log in logs)


@pytest.mark.timeout(180)
def test_parameter_server_loss_falls(tmp_path):
    script = [sys.executable, str(EXAMPLES / "own_loop_parameter_server.py"), "--steps", "60"]
    codes = run_ranks(script, 2, tmp_path, timeout=150)
    log = (tmp_path / "log1.txt").read_text()
    assert codes == [0, 0], log
    assert "rank 1: loss" in log


@pytest.mark.timeout(180)
def test_sync_powersgd_replicas_end_equal(tmp_path):
    script = [sys.executable, str(EXAMPLES / "own_loop_sync_powersgd.py"), "--steps", "10"]
    codes = run_ranks(script, 2, tmp_path, timeout=150)
    logs = [(tmp_path / f"log{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0], logs
    assert all("replicas equal: True" in log for log in logs)
