"""The synthetic learning tasks: their optimum against numpy's least squares and scipy's minimizer."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from distlearn.errors import ConfigError
from distlearn.toy.problems import PROBLEM_NAMES, get_problem, resolve_problems
from distlearn.toy.tasks import correlated_features, linear_regression, logistic_regression


@pytest.mark.parametrize("features", [2, 5])
def test_linear_regression_optimum_matches_numpy_lstsq(features):
    task = linear_regression(samples=80, features=features, seed=3)
    expected, *_ = np.linalg.lstsq(task.inputs.numpy(), task.targets.numpy(), rcond=None)
    np.testing.assert_allclose(task.optimum().numpy(), expected, rtol=1e-10, atol=1e-12)
    residual = task.inputs.numpy() @ expected - task.targets.numpy()
    assert task.minimum_value() == pytest.approx(0.5 * np.mean(residual**2), rel=1e-12)


def _logistic_numpy(w, x, y, l2):
    """The regularized log-loss and its gradient written in numpy, independent of the task's torch code."""
    s = 2 * y - 1
    m = s * (x @ w)
    loss = np.mean(np.logaddexp(0.0, -m)) + 0.5 * l2 * w @ w
    grad = -(x.T @ (s / (1 + np.exp(m)))) / len(y) + l2 * w
    return loss, grad


@pytest.mark.parametrize("features", [2, 4])
def test_logistic_regression_optimum_matches_scipy(features):
    task = logistic_regression(samples=150, features=features, l2=1e-2, seed=1)
    x, y = task.inputs.numpy(), task.targets.numpy()
    found = scipy.optimize.minimize(
        _logistic_numpy,
        np.zeros(features),
        args=(x, y, 1e-2),
        jac=True,
        method="BFGS",
        options={"gtol": 1e-12},
    )
    np.testing.assert_allclose(task.optimum().numpy(), found.x, atol=1e-7)
    assert task.minimum_value() == pytest.approx(found.fun, abs=1e-12)
    loss, _ = _logistic_numpy(task.optimum().numpy(), x, y, 1e-2)
    assert float(task.loss(task.optimum())) == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("make", [linear_regression, logistic_regression])
def test_gradient_vanishes_at_the_optimum(make):
    task = make()
    w = task.optimum().clone().requires_grad_(True)
    task.loss(w).backward()
    assert float(w.grad.norm()) < 1e-10


def test_correlated_features_have_the_asked_correlation():
    generator = torch.Generator().manual_seed(0)
    x = correlated_features(200_000, 3, 0.8, generator).numpy()
    np.testing.assert_allclose(np.corrcoef(x.T), [[1, 0.8, 0.8], [0.8, 1, 0.8], [0.8, 0.8, 1]], atol=0.01)
    with pytest.raises(ConfigError):
        correlated_features(10, 2, 1.0, generator)


def test_tasks_are_deterministic_given_the_seed():
    a, b = logistic_regression(seed=5), logistic_regression(seed=5)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, logistic_regression(seed=6).inputs)


def test_tasks_appear_as_2d_problems_with_their_optimum():
    for name in ("linear-regression", "logistic-regression"):
        problem = get_problem(name)
        (minimum,) = problem.minima
        assert float(problem(torch.tensor(minimum, dtype=torch.float64))) == pytest.approx(
            problem.minimum_value
        )
        x_min, x_max, y_min, y_max = problem.window
        for point in (problem.start, minimum):
            assert x_min < point[0] < x_max and y_min < point[1] < y_max


def test_problem_names_resolve_and_bad_ones_name_the_fix():
    assert resolve_problems("all") == list(PROBLEM_NAMES)
    assert resolve_problems("beale, saddle") == ["beale", "saddle"]
    with pytest.raises(ConfigError, match="choose one of: rosenbrock"):
        resolve_problems("beale,nope")
    with pytest.raises(ConfigError, match="l2 > 0"):
        logistic_regression(l2=0.0)
