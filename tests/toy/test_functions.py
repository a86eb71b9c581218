"""The 2-D test functions: gradients against hand-derived formulas and finite differences, known minima."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from distlearn.errors import ConfigError
from distlearn.toy.functions import FUNCTIONS, QUADRATIC_CONDITION_NUMBER, get_function


def _hand_gradient(name: str, x: float, y: float) -> tuple[float, float]:
    """Gradients derived by hand from each formula (independent of autograd)."""
    if name == "rosenbrock":
        return (-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x))
    if name == "beale":
        a, b, c = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
        return (
            2 * a * (y - 1) + 2 * b * (y**2 - 1) + 2 * c * (y**3 - 1),
            2 * a * x + 2 * b * 2 * x * y + 2 * c * 3 * x * y**2,
        )
    if name == "himmelblau":
        a, b = x * x + y - 11, x + y * y - 7
        return (4 * x * a + 2 * b, 2 * a + 4 * y * b)
    if name == "saddle":
        return (2 * x, y**3 - y)
    if name == "quadratic":
        c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
        # A = R diag(1, 50) R^T written out entry by entry.
        a11, a12, a22 = c * c + 50 * s * s, c * s - 50 * c * s, s * s + 50 * c * c
        return (a11 * x + a12 * y, a12 * x + a22 * y)
    raise AssertionError(name)


def _autograd(name: str, point) -> np.ndarray:
    z = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    FUNCTIONS[name](z).backward()
    return z.grad.numpy()


def test_the_five_required_functions_are_registered():
    assert {"rosenbrock", "beale", "saddle", "himmelblau", "quadratic"} <= set(FUNCTIONS)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradient_matches_hand_derivation_at_random_points(name):
    rng = np.random.default_rng(1)
    x_min, x_max, y_min, y_max = FUNCTIONS[name].window
    for _ in range(20):
        point = (rng.uniform(x_min, x_max), rng.uniform(y_min, y_max))
        np.testing.assert_allclose(
            _autograd(name, point), _hand_gradient(name, *point), rtol=1e-10, atol=1e-9
        )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradient_matches_central_finite_differences(name):
    function = FUNCTIONS[name]
    h = 1e-6
    for point in (function.start, (0.3, -0.7), (1.1, 0.4)):
        z = np.array(point, dtype=np.float64)
        numeric = []
        for i in range(2):
            e = np.zeros(2)
            e[i] = h
            plus = float(function(torch.tensor(z + e)))
            minus = float(function(torch.tensor(z - e)))
            numeric.append((plus - minus) / (2 * h))
        np.testing.assert_allclose(_autograd(name, point), numeric, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_minima_are_stationary_with_the_known_value(name):
    function = FUNCTIONS[name]
    for minimum in function.minima:
        value = float(function(torch.tensor(minimum, dtype=torch.float64)))
        assert value == pytest.approx(function.minimum_value, abs=1e-12)
        assert np.linalg.norm(_autograd(name, minimum)) < 1e-8
        # Positive-definite Hessian: a minimum, not a saddle or maximum.
        hessian = torch.autograd.functional.hessian(function, torch.tensor(minimum, dtype=torch.float64))
        assert torch.linalg.eigvalsh(hessian).min() > 0


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_no_lower_value_in_the_window(name):
    """Brute force over a fine grid plus scipy from many starts: nothing beats the listed minimum."""
    function = FUNCTIONS[name]
    x_min, x_max, y_min, y_max = function.window
    xs, ys = np.meshgrid(np.linspace(x_min, x_max, 401), np.linspace(y_min, y_max, 401))
    grid = torch.tensor(np.stack([xs.ravel(), ys.ravel()], axis=1))
    assert float(function(grid).min()) >= function.minimum_value - 1e-12
    rng = np.random.default_rng(0)
    for _ in range(10):
        x0 = [rng.uniform(x_min, x_max), rng.uniform(y_min, y_max)]
        found = scipy.optimize.minimize(
            lambda z: float(function(torch.tensor(z))),
            x0,
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000},
        )
        assert found.fun >= function.minimum_value - 1e-9


def test_himmelblau_minima_match_scipy():
    function = get_function("himmelblau")
    for minimum in function.minima:
        start = np.array(minimum) + 0.2
        found = scipy.optimize.minimize(
            lambda z: float(function(torch.tensor(z))),
            start,
            jac=lambda z: _hand_gradient("himmelblau", *z),
            method="BFGS",
            options={"gtol": 1e-12},
        )
        np.testing.assert_allclose(found.x, minimum, atol=1e-8)


def test_saddle_has_a_saddle_point_at_the_origin():
    hessian = torch.autograd.functional.hessian(get_function("saddle"), torch.zeros(2, dtype=torch.float64))
    np.testing.assert_allclose(torch.linalg.eigvalsh(hessian).numpy(), [-1.0, 2.0], atol=1e-12)


def test_quadratic_condition_number_is_the_documented_one():
    hessian = torch.autograd.functional.hessian(get_function("quadratic"), torch.ones(2, dtype=torch.float64))
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert float(eigenvalues[1] / eigenvalues[0]) == pytest.approx(QUADRATIC_CONDITION_NUMBER, rel=1e-12)
    assert QUADRATIC_CONDITION_NUMBER == 50


def test_functions_are_batched_over_leading_dimensions():
    points = torch.randn(7, 2, dtype=torch.float64)
    for function in FUNCTIONS.values():
        batched = function(points)
        one_by_one = torch.stack([function(p) for p in points])
        torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-12)


def test_unknown_function_names_the_known_ones():
    with pytest.raises(ConfigError) as error:
        get_function("rosenbrok")
    message = str(error.value)
    assert "rosenbrok" in message
    for name in FUNCTIONS:
        assert name in message
