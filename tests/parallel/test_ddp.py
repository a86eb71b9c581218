"""torch DDP as a strategy: a model with BatchNorm trains and is evaluated on rank 0 alone.

DDP's forward broadcasts buffers (BatchNorm statistics) from rank 0, a collective; evaluating through the
wrapper on rank 0 only would wait for ranks that are not evaluating. The strategy evaluates the module
inside the wrapper (TorchDDP.evaluation_model).
"""

from __future__ import annotations

import json

import pytest

from distlearn.cli import main


@pytest.mark.timeout(240)
def test_ddp_trains_and_evaluates_a_batchnorm_model(tmp_path, capfd):
    # the command in this process: its torchrun job starts from here as from `python -m distlearn`
    code = main([
        "train", "--strategy", "ddp", "--workers", "2",
        "--dataset", "fashion-mnist", "--model", "resnet8", "--train-samples", "512", "--test-samples", "256",
        "--steps", "6", "--eval-every", "3", "--batch-size", "64", "--threads", "1",
        "--out", str(tmp_path), "--progress", "off", "--no-checkpoints", "--quiet",
    ])  # fmt: skip
    done = capfd.readouterr()
    assert code == 0, done.out[-3000:] + done.err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals][-2:] == [3, 6] and all(0 <= r["accuracy"] <= 1 for r in evals)


@pytest.mark.timeout(400)
def test_ddp_with_our_shm_reducer_as_comm_hook_trains_like_ddps_own_allreduce(tmp_path, capfd):
    def losses(hook: str) -> list[float]:
        out = tmp_path / hook
        code = main([
            "train", "--strategy", "ddp", "--workers", "2",
            "--dataset", "fashion-mnist", "--model", "mlp", "--train-samples", "512", "--test-samples", "128",
            "--steps", "8", "--log-every", "1", "--eval-every", "8", "--batch-size", "64", "--threads", "1",
            "--bucket-mb", "0.05", "--comm-hook", hook,
            "--out", str(out), "--progress", "off", "--no-checkpoints", "--quiet",
        ])  # fmt: skip
        done = capfd.readouterr()
        assert code == 0, done.out[-3000:] + done.err[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["kind"] == "train" and "loss" in r]

    default, shm = losses("none"), losses("shm")
    assert len(default) >= 8 and len(shm) == len(default)
    assert shm == pytest.approx(default, rel=1e-5, abs=1e-6)  # the same steps: the same averaged gradients
