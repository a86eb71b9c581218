"""Two-dimensional test functions for watching optimizers move.

The overview's first benchmark (Arnold 2016, section 2, after Ruder's and Radford's well-known animations)
runs each optimizer from the same start on a small surface where the difficulty is visible: a curved
valley (Rosenbrock), flat plateaus with steep walls (Beale), a saddle point, several minima (Himmelblau)
and an ill-conditioned quadratic. Each function is a torch function of a ``(2,)`` tensor ``z = (x, y)``
returning a scalar, so autograd supplies the gradient, and each comes with its standard start point, a
plot window and its known minima (every minimum listed has the value ``minimum_value``).

Example::

    >>> from distlearn.toy.functions import get_function
    >>> f = get_function("rosenbrock")
    >>> float(f(torch.tensor([1.0, 1.0])))
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distlearn.errors import ConfigError

__all__ = [
    "FUNCTIONS",
    "QUADRATIC_CONDITION_NUMBER",
    "TestFunction",
    "beale",
    "get_function",
    "himmelblau",
    "ill_conditioned_quadratic",
    "rosenbrock",
    "saddle",
]


@dataclass(frozen=True)
class TestFunction:
    """A function of ``z = (x, y)`` with what a benchmark needs to know about it.

    ``start`` is where every optimizer begins, ``window`` the plot's ``(x_min, x_max, y_min, y_max)``,
    ``minima`` every global minimizer and ``minimum_value`` the value f* there, so ``f - f*`` measures
    progress. ``formula`` is LaTeX for the docs and plot titles.
    """

    __test__ = False  # not a pytest test class, despite the name

    name: str
    formula: str
    function: Callable[[torch.Tensor], torch.Tensor]
    start: tuple[float, float]
    window: tuple[float, float, float, float]
    minima: tuple[tuple[float, float], ...]
    minimum_value: float
    note: str = ""

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.function(z)

    @property
    def dim(self) -> int:
        return 2

    def initial_point(self) -> torch.Tensor:
        return torch.tensor(self.start, dtype=torch.float64)


def rosenbrock(z: torch.Tensor) -> torch.Tensor:
    """Rosenbrock (1960): ``(1 - x)^2 + 100 (y - x^2)^2``, minimum 0 at (1, 1) in a curved flat valley."""
    x, y = z[..., 0], z[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(z: torch.Tensor) -> torch.Tensor:
    """Beale: ``sum_i (c_i - x + x y^i)^2`` with c = (1.5, 2.25, 2.625), minimum 0 at (3, 0.5)."""
    x, y = z[..., 0], z[..., 1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def himmelblau(z: torch.Tensor) -> torch.Tensor:
    """Himmelblau (1972): ``(x^2 + y - 11)^2 + (x + y^2 - 7)^2``, four minima of value 0."""
    x, y = z[..., 0], z[..., 1]
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def saddle(z: torch.Tensor) -> torch.Tensor:
    """A saddle at the origin between two valleys: ``x^2 + y^4/4 - y^2/2``.

    The Hessian at (0, 0) is diag(2, -1): the x^2 - y^2/2 saddle of the animations, but bounded below, so
    it has minima (0, +-1) with value -1/4 and "steps to tolerance" measures how fast a method escapes.
    """
    x, y = z[..., 0], z[..., 1]
    return x**2 + y**4 / 4 - y**2 / 2


# The quadratic's eigenvalues and the angle of its long axis: condition number 50 / 1 = 50.
QUADRATIC_EIGENVALUES = (1.0, 50.0)
QUADRATIC_CONDITION_NUMBER = QUADRATIC_EIGENVALUES[1] / QUADRATIC_EIGENVALUES[0]
QUADRATIC_ANGLE = math.radians(30.0)


def _quadratic_matrix() -> torch.Tensor:
    """A = R diag(1, 50) R^T, with R the rotation by 30 degrees (so the axes are not the coordinates)."""
    c, s = math.cos(QUADRATIC_ANGLE), math.sin(QUADRATIC_ANGLE)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rotation @ torch.diag(torch.tensor(QUADRATIC_EIGENVALUES, dtype=torch.float64)) @ rotation.T


_QUADRATIC_A = _quadratic_matrix()


def ill_conditioned_quadratic(z: torch.Tensor) -> torch.Tensor:
    """``z^T A z / 2`` with A of eigenvalues 1 and 50 (condition number 50), axes rotated by 30 degrees.

    Gradient descent needs a step below 2/50 for stability and then about 50 ln(1/eps) steps; the
    rotation keeps per-coordinate methods (Adagrad, RMSprop, Adam) from aligning with the axes for free.
    """
    a = _QUADRATIC_A.to(z.dtype)
    return 0.5 * torch.einsum("...i,ij,...j->...", z, a, z)


FUNCTIONS: dict[str, TestFunction] = {
    f.name: f
    for f in (
        TestFunction(
            name="rosenbrock",
            formula=r"$(1-x)^2 + 100\,(y-x^2)^2$",
            function=rosenbrock,
            start=(-1.5, 2.0),
            window=(-2.0, 2.0, -1.0, 3.0),
            minima=((1.0, 1.0),),
            minimum_value=0.0,
            note="a curved, nearly flat valley: easy to find, slow to follow",
        ),
        TestFunction(
            name="beale",
            formula=r"$(1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2$",
            function=beale,
            start=(1.0, 1.5),
            window=(-0.5, 4.5, -1.5, 2.5),
            minima=((3.0, 0.5),),
            minimum_value=0.0,
            note="steep walls and flat plateaus: gradients span many orders of magnitude",
        ),
        TestFunction(
            name="saddle",
            formula=r"$x^2 + y^4/4 - y^2/2$",
            function=saddle,
            start=(-1.5, 1e-3),
            window=(-2.0, 2.0, -1.6, 1.6),
            minima=((0.0, 1.0), (0.0, -1.0)),
            minimum_value=-0.25,
            note="starts almost on the saddle's stable axis: a test of escaping a saddle point",
        ),
        TestFunction(
            name="himmelblau",
            formula=r"$(x^2+y-11)^2 + (x+y^2-7)^2$",
            function=himmelblau,
            start=(-0.5, -0.5),
            window=(-5.0, 5.0, -5.0, 5.0),
            minima=(
                (3.0, 2.0),
                (-2.805118086952745, 3.131312518250573),
                (-3.779310253377747, -3.283185991286170),
                (3.584428340330492, -1.848126526964404),
            ),
            minimum_value=0.0,
            note="four minima: which one an optimizer reaches depends on its path",
        ),
        TestFunction(
            name="quadratic",
            formula=r"$\frac{1}{2} z^\top A z$, eigenvalues of $A$: 1, 50 (axes rotated 30°)",
            function=ill_conditioned_quadratic,
            start=(-2.5, 2.0),
            window=(-3.0, 3.0, -2.5, 2.5),
            minima=((0.0, 0.0),),
            minimum_value=0.0,
            note=f"ill-conditioned: condition number {QUADRATIC_CONDITION_NUMBER:g}, axes rotated 30 degrees",
        ),
    )
}


def get_function(name: str) -> TestFunction:
    """The test function called ``name``; an unknown name raises ConfigError naming the known ones."""
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown toy function {name!r}; choose one of: {', '.join(FUNCTIONS)} (or 'all')"
        ) from None
