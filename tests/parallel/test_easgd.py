"""EASGD against the paper's equations on a quadratic, in real multi-process jobs on 127.0.0.1.

Worker ``i`` minimises ``1/2 ||x - c_i||^2``. The strategy's trajectories are compared step by step with an
independent float64 re-enactment of Zhang, Choromanska & LeCun (2015): eqs. 5-6 (synchronous EASGD),
Algorithm 1 (asynchronous, here with one worker so the order is fixed) and Algorithm 2 (EAMSGD, Nesterov
momentum). The fixed point gives a closed form to check too: ``x_i - x~ = (c_i - mean c) / (1 + rho)``, so
``rho = 0`` leaves every worker at its own optimum and a large ``rho`` pulls them together.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from easgd_cases import LR, STEPS, cases, optimum  # noqa: E402

from distlearn.errors import ConfigError  # noqa: E402
from distlearn.launch import launch_local  # noqa: E402
from distlearn.parallel import create_strategy  # noqa: E402
from distlearn.parallel.easgd import ElasticAveraging  # noqa: E402
from distlearn.train import TrainConfig  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "easgd_worker.py")


def reenact(workers: int, rho: float, tau: int, momentum: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's update in float64; returns the stored weights ``(steps, workers, d)`` and the final centre.

    With ``momentum`` (Algorithm 2) the stored weights are the look-ahead ``x + delta * v`` where the
    gradient is taken, which is what a Nesterov optimizer keeps in the model.
    """
    targets = torch.stack([optimum(i) for i in range(workers)]).double()
    x = torch.zeros_like(targets)
    v = torch.zeros_like(targets)
    centre = torch.zeros(targets.shape[1], dtype=torch.float64)
    alpha = LR * rho
    stored = []
    for t in range(STEPS):
        copy = x.clone()  # "x <- x^i": gradient and elastic pull both use it
        if t % tau == 0:
            x = x - alpha * (copy - centre)
            centre = centre + alpha * (copy - centre).sum(dim=0)
        gradient = (copy + momentum * v) - targets  # grad of 1/2 ||x - c||^2 at the look-ahead point
        v = momentum * v - LR * gradient
        x = x + v
        stored.append(x + momentum * v)
    return torch.stack(stored), centre


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("easgd-sync")
    code = launch_local([WORKER, str(out), "sync"], 2, module=False, timeout_s=120)
    assert code == 0, f"the 2-worker EASGD job failed (exit {code}); its output is above"
    return out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("label,rho,tau,optimizer,options", cases("sync"))
def test_sync_easgd_follows_the_paper(sync_results, label, rho, tau, optimizer, options):
    saved = torch.load(sync_results / f"{label}.pt", weights_only=True)
    expected, centre = reenact(2, rho, tau, options.get("momentum", 0.0))
    got = saved["trajectories"].permute(1, 0, 2).double()  # (steps, workers, d)
    assert float((got - expected).abs().max()) < 1e-4, f"{label}: trajectory differs from eqs. 5-6 / Alg. 2"
    assert float((saved["centre"].double() - centre).abs().max()) < 1e-4, f"{label}: centre differs"


@pytest.mark.timeout(150)
def test_rho_zero_leaves_workers_independent_and_large_rho_pulls_them_together(sync_results):
    c0, c1 = optimum(0), optimum(1)
    independent = torch.load(sync_results / "sync-rho0.pt", weights_only=True)
    final = independent["trajectories"][:, -1]
    assert torch.allclose(final[0], c0, atol=1e-4) and torch.allclose(final[1], c1, atol=1e-4)
    assert torch.equal(independent["centre"], torch.zeros(3))  # no force, the centre never moves
    rho = 5.0
    pulled = torch.load(sync_results / "sync-rho5.pt", weights_only=True)
    final, centre = pulled["trajectories"][:, -1], pulled["centre"]
    mean = (c0 + c1) / 2
    assert torch.allclose(centre, mean, atol=1e-4)
    for worker, target in enumerate((c0, c1)):  # x_i - x~ = (c_i - mean c) / (1 + rho)
        assert torch.allclose(final[worker] - centre, (target - mean) / (1 + rho), atol=1e-4)
    spread = pulled["trajectories"][0] - pulled["trajectories"][1]  # (steps, d)
    distances = spread.norm(dim=1)
    assert distances[-1] < (c0 - c1).norm() / (1 + rho) + 1e-4  # six times closer than alone


@pytest.mark.timeout(150)
def test_async_easgd_with_one_worker_follows_algorithm_1_and_2(tmp_path):
    code = launch_local([WORKER, str(tmp_path), "async"], 2, module=False, timeout_s=120)
    assert code == 0, f"the async EASGD job (centre + 1 worker) failed (exit {code})"
    for label, rho, tau, _, options in cases("async"):
        saved = torch.load(tmp_path / f"{label}.pt", weights_only=True)
        expected, centre = reenact(1, rho, tau, options.get("momentum", 0.0))
        got = saved["trajectories"].permute(1, 0, 2).double()
        assert float((got - expected).abs().max()) < 1e-4, f"{label}: trajectory differs from Algorithm 1/2"
        assert float((saved["centre"].double() - centre).abs().max()) < 1e-4, f"{label}: centre differs"


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="easgd-mode"):
        ElasticAveraging(mode="round-robin")
    with pytest.raises(ConfigError, match="not both"):
        ElasticAveraging(rho=1.0, moving_rate=0.1)
    with pytest.raises(ConfigError, match="elastic-rho"):
        ElasticAveraging(rho=-1.0)
    with pytest.raises(ConfigError, match="moving-rate"):
        ElasticAveraging(moving_rate=1.5)
    with pytest.raises(ConfigError, match="elastic-tau"):
        ElasticAveraging(tau=0)
    strategy = ElasticAveraging(rho=20.0)  # alpha = lr * rho = 2 at lr 0.1: unstable
    strategy.world_size = 2
    with pytest.raises(ConfigError, match="unstable"):
        strategy.alpha(0.1)
    with pytest.raises(ConfigError, match="torchrun"):
        ElasticAveraging().setup(seed=0)
    built = create_strategy("easgd", run=TrainConfig.build(strategy="easgd", elastic_tau=3, elastic_rho=0.5))
    assert isinstance(built, ElasticAveraging) and built.tau == 3 and built.rho == 0.5
