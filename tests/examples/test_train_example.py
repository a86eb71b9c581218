"""examples/train_sequence_regression.py at a tiny size: two replicas launched by train(), the loss falls."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from distlearn.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def example(monkeypatch):
    # the workers import the example by its import path, from the repository root
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{REPO / 'src'}")
    return importlib.import_module("examples.train_sequence_regression")


@pytest.mark.timeout(240)
def test_sequence_regression_loss_falls_with_two_sync_workers(example, tmp_path):
    result = example.run(workers=2, steps=40, out=str(tmp_path / "run"), quiet=True)
    _, (test_x, test_y) = example.make_data()
    baseline = float(((test_y - test_y.mean()) ** 2).mean())  # the MSE of predicting the mean
    assert result.steps == 40 and result.summary["replicas"] == 2
    assert result.test_accuracy is None and result.summary["classification"] is False
    assert result.test_loss < 0.5 * baseline
    train_losses = [r.loss for r in read_metrics(result.metrics_path) if r.kind == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    # rank 0's final weights came back with the result: they give the reported test loss
    with torch.no_grad():
        predictions = result.model(test_x)
    assert abs(float(((predictions - test_y) ** 2).mean()) - result.test_loss) < 1e-4
