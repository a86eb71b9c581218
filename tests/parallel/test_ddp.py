"""torch DDP as a strategy: a model with BatchNorm trains and is evaluated on rank 0 alone, with DDP's own
allreduce and with our shm reducer as its comm hook, which trains like it.

DDP's forward broadcasts buffers (BatchNorm statistics) from rank 0, a collective; evaluating through the
wrapper on rank 0 only would wait for ranks that are not evaluating. The strategy evaluates the module
inside the wrapper (TorchDDP.evaluation_model). Both tests read the same two runs (module fixture): one
job per comm hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distlearn.cli import main

HOOKS = ("none", "shm")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """hook -> (exit status, its --out): ``distlearn train --strategy ddp`` of a BatchNorm model (resnet8)
    on 2 workers, evaluated every 4 of 8 steps, a loss logged every step. The jobs' output goes to the first
    test's captured output (pytest shows it with a failure)."""
    runs = {}
    for hook in HOOKS:
        out = tmp_path_factory.mktemp(f"ddp-{hook}")
        # the command in this process: its torchrun job starts from here as from `python -m distlearn`
        code = main([
            "train", "--strategy", "ddp", "--workers", "2", "--dataset", "fashion-mnist",
            "--model", "resnet8", "--train-samples", "512", "--test-samples", "256", "--batch-size", "64",
            "--steps", "8", "--log-every", "1", "--eval-every", "4", "--threads", "1",
            "--bucket-mb", "0.05", "--comm-hook", hook,
            "--out", str(out), "--progress", "off", "--no-checkpoints", "--quiet",
        ])  # fmt: skip
        runs[hook] = (code, out)
    return runs


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("hook", HOOKS)
def test_ddp_trains_and_evaluates_a_batchnorm_model(ddp_runs, hook):
    code, out = ddp_runs[hook]
    assert code == 0, f"distlearn train --comm-hook {hook} exited {code}: see the first test's output"
    evals = [r for r in _records(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals][-2:] == [4, 8] and all(0 <= r["accuracy"] <= 1 for r in evals)


@pytest.mark.timeout(400)
def test_ddp_with_our_shm_reducer_as_comm_hook_trains_like_ddps_own_allreduce(ddp_runs):
    losses = {}
    for hook in HOOKS:
        code, out = ddp_runs[hook]
        assert code == 0, f"distlearn train --comm-hook {hook} exited {code}: see the first test's output"
        losses[hook] = [r["loss"] for r in _records(out) if r["kind"] == "train" and "loss" in r]
    default, shm = losses["none"], losses["shm"]
    assert len(default) >= 8 and len(shm) == len(default)
    assert shm == pytest.approx(default, rel=1e-5, abs=1e-6)  # the same steps: the same averaged gradients
