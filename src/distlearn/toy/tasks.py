"""Small synthetic learning tasks with a known optimum: least squares and L2-regularized logistic regression.

These are the smallest real learning problems: the loss is an average over samples, as in the overview's
empirical risk ``L(w) = (1/n) sum_i l(x_i, y_i; w)`` (Arnold 2016, section 2), and the optimum w* is known
(closed form for least squares, Newton's method to machine precision for logistic regression) so every
optimizer's ``L(w_t) - L(w*)`` can be measured. With two features the loss surface is 2-D and the same
contour plots and animations as the test functions apply (:meth:`Task.as_test_function`).

The features are drawn correlated (``correlation``), which makes the Hessian ill-conditioned the way real
inputs do; the optimizers see the full batch (deterministic gradients), the setting of the toy benchmark.

Example::

    >>> task = linear_regression(samples=100, features=2)
    >>> w_star = task.optimum()
    >>> float(task.loss(w_star)) == task.minimum_value()
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distlearn.errors import ConfigError
from distlearn.toy.functions import TestFunction

__all__ = ["Task", "linear_regression", "logistic_regression", "correlated_features"]


def correlated_features(samples: int, features: int, correlation: float, generator: torch.Generator):
    """``samples x features`` Gaussian inputs with unit variance and pairwise correlation ``correlation``."""
    if not 0.0 <= correlation < 1.0:
        raise ConfigError(f"correlation must be in [0, 1), got {correlation}; pick e.g. 0.8")
    # x = sqrt(1 - rho) * e + sqrt(rho) * shared, so Cov(x_j, x_k) = rho for j != k and Var(x_j) = 1.
    independent = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    shared = torch.randn(samples, 1, generator=generator, dtype=torch.float64)
    return (1.0 - correlation) ** 0.5 * independent + correlation**0.5 * shared


@dataclass
class Task:
    """A full-batch learning task: inputs ``X`` (n, d), targets ``y`` (n,), a loss of the weights ``w`` (d,).

    ``kind`` is ``"least-squares"``: ``L(w) = ||X w - y||^2 / (2 n)``, or ``"logistic"`` with labels in
    {0, 1}: ``L(w) = (1/n) sum_i log(1 + exp(-s_i x_i^T w)) + (l2 / 2) ||w||^2`` with ``s_i = 2 y_i - 1``.
    """

    name: str
    kind: str
    inputs: torch.Tensor
    targets: torch.Tensor
    l2: float = 0.0
    start: tuple[float, ...] = ()
    _optimum: torch.Tensor | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return self.inputs.shape[1]

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """The average loss at weights ``w`` (..., d), differentiable in ``w``; batched over leading dims."""
        x, y = self.inputs.to(w.dtype), self.targets.to(w.dtype)
        margin = w @ x.T  # (..., n): x_i^T w for every sample
        if self.kind == "least-squares":
            data_term = 0.5 * ((margin - y) ** 2).mean(dim=-1)
        else:
            signs = 2.0 * y - 1.0
            data_term = F.softplus(-signs * margin).mean(dim=-1)
        return data_term + 0.5 * self.l2 * (w * w).sum(dim=-1)

    __call__ = loss

    def optimum(self) -> torch.Tensor:
        """The minimizer w*: the normal equations for least squares, Newton's method for logistic."""
        if self._optimum is None:
            self._optimum = self._solve()
        return self._optimum

    def minimum_value(self) -> float:
        return float(self.loss(self.optimum()))

    def _solve(self) -> torch.Tensor:
        x, y, n = self.inputs, self.targets, self.inputs.shape[0]
        regularizer = self.l2 * torch.eye(self.dim, dtype=torch.float64)
        if self.kind == "least-squares":
            # grad = X^T (X w - y) / n + l2 w = 0  =>  (X^T X / n + l2 I) w = X^T y / n
            return torch.linalg.solve(x.T @ x / n + regularizer, x.T @ y / n)
        w = torch.zeros(self.dim, dtype=torch.float64)
        signs = 2.0 * y - 1.0
        for _ in range(100):
            p = torch.sigmoid(-signs * (x @ w))  # sigma(-s x^T w), the derivative of softplus
            gradient = -(x.T @ (signs * p)) / n + self.l2 * w
            hessian = (x.T * (p * (1 - p))) @ x / n + regularizer
            w = w - torch.linalg.solve(hessian, gradient)
            if gradient.norm() < 1e-14:
                break
        return w

    def as_test_function(self, margin: float = 0.6) -> TestFunction:
        """The task as a 2-D test function (needs d = 2): start, window around start and w*, f*."""
        if self.dim != 2:
            raise ConfigError(f"task {self.name} has {self.dim} features; plots need exactly 2")
        w_star = self.optimum().tolist()
        xs, ys = (self.start[0], w_star[0]), (self.start[1], w_star[1])
        pad_x, pad_y = margin * (max(xs) - min(xs)) + 0.5, margin * (max(ys) - min(ys)) + 0.5
        formula = (
            r"$\frac{1}{2n}\|Xw-y\|^2$"
            if self.kind == "least-squares"
            else r"$\frac{1}{n}\sum_i \log(1+e^{-s_i x_i^\top w}) + \frac{\lambda}{2}\|w\|^2$"
        )
        return TestFunction(
            name=self.name,
            formula=formula,
            function=self.loss,
            start=(float(self.start[0]), float(self.start[1])),
            window=(min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y),
            minima=((w_star[0], w_star[1]),),
            minimum_value=self.minimum_value(),
            note=f"{self.kind} on {self.inputs.shape[0]} samples with correlated features",
        )


def linear_regression(
    samples: int = 100,
    features: int = 2,
    *,
    correlation: float = 0.8,
    noise: float = 0.5,
    seed: int = 0,
    start: tuple[float, ...] | None = None,
) -> Task:
    """Least squares on ``y = X w_true + noise``, with ``w_true = (1, -2, 1, -2, ...)``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = correlated_features(samples, features, correlation, generator)
    w_true = torch.tensor([1.0 if j % 2 == 0 else -2.0 for j in range(features)], dtype=torch.float64)
    targets = inputs @ w_true + noise * torch.randn(samples, generator=generator, dtype=torch.float64)
    start = start if start is not None else tuple([-2.0, 2.0] + [0.0] * (features - 2))[:features]
    return Task("linear-regression", "least-squares", inputs, targets, l2=0.0, start=start)


def logistic_regression(
    samples: int = 200,
    features: int = 2,
    *,
    correlation: float = 0.8,
    l2: float = 1e-2,
    seed: int = 0,
    start: tuple[float, ...] | None = None,
) -> Task:
    """L2-regularized logistic regression on labels drawn from ``P(y=1|x) = sigmoid(x^T w_true)``.

    The L2 term keeps the optimum finite and unique even if the classes happen to be separable.
    """
    if l2 <= 0:
        raise ConfigError(f"logistic regression needs l2 > 0 for a unique optimum, got {l2}; try 1e-2")
    generator = torch.Generator().manual_seed(seed)
    inputs = correlated_features(samples, features, correlation, generator)
    w_true = torch.tensor([2.0 if j % 2 == 0 else -1.0 for j in range(features)], dtype=torch.float64)
    probabilities = torch.sigmoid(inputs @ w_true)
    targets = (torch.rand(samples, generator=generator, dtype=torch.float64) < probabilities).double()
    start = start if start is not None else tuple([-2.0, 2.0] + [0.0] * (features - 2))[:features]
    return Task("logistic-regression", "logistic", inputs, targets, l2=l2, start=start)
