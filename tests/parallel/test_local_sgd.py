"""Local SGD: with k = 1 it is synchronous SGD; averages make replicas identical; post-local warm-up is sync.

A real 2-worker torchrun job on 127.0.0.1 trains the sync test's small problem for 12 steps with plain SGD
(global batch 24), once with the sync strategy and once per local-SGD setting.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distlearn.errors import ConfigError  # noqa: E402
from distlearn.launch import launch_local  # noqa: E402
from distlearn.parallel import create_strategy  # noqa: E402
from distlearn.parallel.local_sgd import LocalSGD  # noqa: E402
from distlearn.train import TrainConfig  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "local_sgd_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("local-sgd")
    code = launch_local([WORKER, str(out)], 2, module=False, timeout_s=150)
    assert code == 0, f"the 2-worker local-SGD job failed (exit {code}); its output is above"
    labels = ["sync", "k1", "k4", "k5", "warmup12-k4", "warmup4-k4"]
    return {label: torch.load(out / f"{label}.pt", weights_only=True) for label in labels}


@pytest.mark.timeout(180)
def test_k1_equals_synchronous_sgd(runs):
    difference = float((runs["k1"]["weights"] - runs["sync"]["weights"]).abs().max())
    assert difference < 1e-5, f"local SGD with k = 1 differs from sync SGD by {difference:.2e}"
    assert runs["k1"]["identical"] and runs["sync"]["identical"]
    assert runs["k1"]["bytes_sent"] > 0


@pytest.mark.timeout(180)
def test_replicas_are_identical_right_after_an_average_and_drift_in_between(runs):
    assert runs["k4"]["identical"]  # 12 steps: the last step is an average (after steps 4, 8, 12)
    assert not runs["k5"]["identical"]  # after steps 5 and 10 only: two local steps of drift at the end
    difference = float((runs["k4"]["weights"] - runs["sync"]["weights"]).abs().max())
    assert difference > 1e-4, "k = 4 should not follow the synchronous trajectory exactly"
    assert runs["k4"]["bytes_sent"] < runs["k1"]["bytes_sent"] / 3  # 3 averages instead of 12


@pytest.mark.timeout(180)
def test_post_local_warmup_is_synchronous_sgd(runs):
    difference = float((runs["warmup12-k4"]["weights"] - runs["sync"]["weights"]).abs().max())
    assert difference < 1e-5, "12 warm-up steps of a 12-step run must be exactly sync SGD"
    assert runs["warmup4-k4"]["identical"]  # local steps 5..8 and 9..12, averaged after 8 and 12
    assert float((runs["warmup4-k4"]["weights"] - runs["sync"]["weights"]).abs().max()) > 1e-4


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="average-every"):
        LocalSGD(period=0)
    with pytest.raises(ConfigError, match="post-local-warmup"):
        LocalSGD(warmup_steps=-1)
    with pytest.raises(ConfigError, match="torchrun"):
        LocalSGD().setup(seed=0)
    built = create_strategy(
        "local-sgd", run=TrainConfig.build(strategy="local-sgd", average_every=8, post_local_warmup=3)
    )
    assert isinstance(built, LocalSGD) and built.period == 8 and built.warmup_steps == 3
