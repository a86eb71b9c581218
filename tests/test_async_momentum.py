"""Asynchrony begets momentum: exact simulation of M memoryless workers, fitted momentum close to 1 - 1/M."""

from __future__ import annotations

import pytest
import torch

from distlearn.async_momentum import (
    CURVATURES,
    compensated_momentum,
    fit_momentum,
    measure,
    real_async,
    simulate_async,
    simulate_sync_momentum,
)
from distlearn.errors import ConfigError


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [2, 4, 8])
def test_fitted_implicit_momentum_is_one_minus_one_over_m(workers):
    fit, _ = measure(workers, lr=0.5, steps=120, runs=4000, seed=1)
    assert abs(fit.momentum - (1 - 1 / workers)) < 0.05, f"M={workers}: fitted {fit.momentum:.3f}"
    assert abs(fit.effective_lr - 0.5 / workers) < 0.25 * 0.5 / workers  # the rate is eta / M


def test_one_worker_is_plain_sgd_and_the_fit_recovers_known_momentum():
    single = simulate_async(1, lr=0.5, steps=50, runs=3)
    plain = simulate_sync_momentum(lr=0.5, momentum=0.0, steps=50)
    for run in range(3):
        assert torch.allclose(single[:, run], plain, atol=1e-12, rtol=0)  # no staleness with M = 1
    heavy_ball = simulate_sync_momentum(lr=0.1, momentum=0.7, steps=80)
    momentum, lr, residual = fit_momentum(heavy_ball)
    assert abs(momentum - 0.7) < 1e-9 and abs(lr - 0.1) < 1e-9 and residual < 1e-9


def test_staleness_is_real():
    # With several workers most updates use parameters that others have overwritten: runs diverge.
    runs = simulate_async(4, lr=0.5, steps=30, runs=64, seed=3)
    assert runs[-1].std(dim=0).max() > 1e-3
    assert not torch.allclose(runs.mean(dim=1), simulate_sync_momentum(lr=0.5, momentum=0.0, steps=30))


def test_compensation_and_bad_input():
    assert compensated_momentum(0.9, 2) == pytest.approx(0.4)
    assert compensated_momentum(0.9, 16) < 0  # negative explicit momentum for many workers
    with pytest.raises(ConfigError, match="workers"):
        simulate_async(0, lr=0.1, steps=10)
    with pytest.raises(ConfigError, match="momentum"):
        simulate_async(2, lr=0.1, steps=10, explicit_momentum=1.5)


@pytest.mark.timeout(120)
def test_real_processes_race_and_every_update_used_the_weights_it_read():
    """Two real processes: each logged update must be w_{t+1} = w_t - lr H w_{t - tau_t} with the measured
    staleness tau_t (exact replay), the staleness must really vary, and one process is plain SGD."""
    lr, steps, runs = 0.5, 20, 30
    hessian = torch.tensor(CURVATURES, dtype=torch.float64)
    trajectory, staleness = real_async(2, lr=lr, steps=steps, runs=runs, mean_compute_s=5e-4)
    assert trajectory.shape == (steps + 1, runs, 2) and staleness.shape == (runs, steps)
    assert staleness.min() >= 0 and staleness.max() >= 1 and (staleness == 0).any()
    for run in range(runs):
        path = trajectory[:, run]
        for t in range(steps):
            expected = path[t] - lr * (hessian * path[t - int(staleness[run, t])])
            assert torch.equal(path[t + 1], expected), (run, t)
    single, never_stale = real_async(1, lr=lr, steps=steps, runs=2, mean_compute_s=5e-4)
    assert int(never_stale.max()) == 0
    assert torch.allclose(single[:, 0], simulate_sync_momentum(lr=lr, momentum=0.0, steps=steps), atol=1e-12)
