"""The overview's first-order optimizers, simple to complex, in its (neon-style) notation.

Arnold (2016), section 2, writes every method as an update of the weights ``W`` from the mini-batch
gradient ``g``. Each class below carries its rule, its paper, and exactly where ``torch.optim`` differs;
:func:`distlearn.optim.torch_equivalent` gives the ``torch.optim`` hyper-parameters that reproduce it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch

from distlearn.errors import ConfigError
from distlearn.optim.base import FirstOrderOptimizer, check_nonnegative, check_unit_interval

__all__ = ["SGD", "Momentum", "Nesterov", "Adagrad", "RMSProp", "Adadelta", "Adam"]


class SGD(FirstOrderOptimizer):
    """Minibatch stochastic gradient descent (Robbins & Monro, 1951).

    Update: ``W = W - lr * g``.

    Same as ``torch.optim.SGD(lr=lr)``. Tuning: the largest ``lr`` that does not diverge, decayed later.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        *,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        flat: bool = False,
    ) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "foreach": foreach}, flat=flat)

    def _single(self, group, param, grad, state) -> None:
        param.add_(grad, alpha=-group["lr"])

    def _foreach(self, group, params, grads, states) -> None:
        torch._foreach_add_(params, grads, alpha=-group["lr"])


class _ScaledVelocity(FirstOrderOptimizer):
    """Momentum and Nesterov keep the velocity as a scale times a direction, ``v = +-s * u``.

    Both recurrences have the form ``s' * u' = mu * s * u + lr * g``; with ``s' = mu * s + lr`` that is
    ``u' = lerp(u, g, lr / s')``: one pass over ``u`` and ``g`` where ``v = mu * v + lr * g`` takes two
    (scale ``v``, then add ``g``). ``s`` is a number per parameter (``state["velocity_scale"]``), ``u`` a
    tensor (``state["velocity_direction"]``); ``s`` tends to ``lr / (1 - mu)``, so neither grows.
    :meth:`velocity` gives ``v``. Checkpoints of the older form (``state["velocity"]``) load as ``s = 1``.
    """

    state_names = ("velocity_direction",)
    sign = 1.0  # v = sign * s * u

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        momentum: float = 0.9,
        *,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults, flat=flat)

    def _check_group(self, group) -> None:
        super()._check_group(group)
        check_unit_interval("momentum", group["momentum"], type(self).__name__, "use e.g. momentum=0.9")

    def _initial_state(self, group, param, state) -> None:
        state["velocity_scale"] = 0.0  # v = 0

    def velocity(self, param: torch.Tensor) -> torch.Tensor | None:
        """The velocity ``v`` of ``param`` (a new tensor, in the rule's convention); None before a step."""
        self._sync_flat_numbers()
        state = self.state.get(param, {})
        if "velocity_direction" not in state:
            return None
        return state["velocity_direction"] * (self.sign * state["velocity_scale"])

    def _upgrade_state(self) -> None:
        for state in self.state.values():  # the older form stored v itself
            if "velocity" in state and "velocity_direction" not in state:
                state["velocity_direction"] = state.pop("velocity") * self.sign
                state["velocity_scale"] = 1.0

    @staticmethod
    def _next_scale(group, state) -> tuple[float, float]:
        """``(s', lr / s')`` for one step; ``s' = 0`` only while ``lr`` has been 0 since the start."""
        scale = group["momentum"] * state["velocity_scale"] + group["lr"]
        return scale, (group["lr"] / scale if scale > 0 else 0.0)

    def _foreach(self, group, params, grads, states) -> None:
        scales = [state["velocity_scale"] for state in states]
        if scales.count(scales[0]) == len(scales):  # the usual case: every parameter stepped together
            self._foreach_same_scale(group, params, grads, states)
            return
        for scale in dict.fromkeys(scales):
            chosen = [i for i, s in enumerate(scales) if s == scale]
            self._foreach_same_scale(
                group, [params[i] for i in chosen], [grads[i] for i in chosen], [states[i] for i in chosen]
            )


class Momentum(_ScaledVelocity):
    """Classical (heavy-ball) momentum (Polyak, 1964; Rumelhart, Hinton & Williams, 1986).

    Update: ``v = mu * v + lr * g ;  W = W - v`` with ``v`` starting at zero.

    ``torch.optim.SGD(lr, momentum=mu)`` keeps ``b = mu * b + g`` and steps ``W -= lr * b``: the same
    trajectory while ``lr`` is constant (``v = lr * b``); under a changing ``lr`` ours keeps old steps at
    their old size, torch rescales them. Tuning: ``mu`` 0.9, then ``lr`` about ``(1 - mu)`` times SGD's.

    Stored as ``v = s * u`` (see :class:`_ScaledVelocity`): a step is ``s' = mu * s + lr ;
    u = lerp(u, g, lr / s') ;  W = W - s' * u``, two passes over memory where the plain form takes three.
    """

    def _single(self, group, param, grad, state) -> None:
        scale, weight = self._next_scale(group, state)
        u = state["velocity_direction"]
        u.lerp_(grad, weight)  # s'*u' = mu*s*u + lr*g, i.e. v = mu*v + lr*g
        param.add_(u, alpha=-scale)  # W = W - v
        state["velocity_scale"] = scale

    def _foreach_same_scale(self, group, params, grads, states) -> None:
        scale, weight = self._next_scale(group, states[0])
        directions = self._buffers(states, "velocity_direction")
        torch._foreach_lerp_(directions, grads, weight)
        torch._foreach_add_(params, directions, alpha=-scale)
        for state in states:
            state["velocity_scale"] = scale


class Nesterov(_ScaledVelocity):
    """Nesterov's accelerated gradient (Nesterov, 1983; Sutskever et al., 2013), in Bengio et al.'s form.

    Update: ``v_new = mu * v - lr * g ;  W = W - mu * v + (1 + mu) * v_new`` (``v`` starting at zero).

    This is the look-ahead method rewritten so that the gradient is taken at the stored weights
    (Bengio, Boulanger-Lewandowski & Pascanu, 2013). An early draft of the overview wrote
    ``v = mu * (mu * v + lr * g) + lr * g`` for the step: that is the same step only if the stored
    velocity stays ``mu * v + lr * g`` (the heavy-ball velocity, with the opposite sign convention) and
    the look-ahead term is recomputed from it each time; storing the printed expression as the new
    velocity gives a different method. We store ``v_new``.

    ``torch.optim.SGD(lr, momentum=mu, nesterov=True)`` (``b = mu*b + g ; W -= lr*(g + mu*b)``) gives the
    same trajectory for a constant ``lr`` (``v = -lr * b``). Stored as ``v = -s * u`` (see
    :class:`_ScaledVelocity`); substituting ``v_new`` gives the equal ``W = W + mu * v_new - lr * g``, so a
    step is ``s' = mu * s + lr ;  u = lerp(u, g, lr / s') ;  W = W - mu * s' * u - lr * g``.
    """

    sign = -1.0

    def _single(self, group, param, grad, state) -> None:
        scale, weight = self._next_scale(group, state)
        u = state["velocity_direction"]
        u.lerp_(grad, weight)  # v_new = mu*v - lr*g with v = -s*u
        param.add_(u, alpha=-group["momentum"] * scale).add_(grad, alpha=-group["lr"])  # W += mu*v_new - lr*g
        state["velocity_scale"] = scale

    def _foreach_same_scale(self, group, params, grads, states) -> None:
        scale, weight = self._next_scale(group, states[0])
        directions = self._buffers(states, "velocity_direction")
        torch._foreach_lerp_(directions, grads, weight)
        torch._foreach_add_(params, directions, alpha=-group["momentum"] * scale)
        torch._foreach_add_(params, grads, alpha=-group["lr"])
        for state in states:
            state["velocity_scale"] = scale


class Adagrad(FirstOrderOptimizer):
    """Adagrad (Duchi, Hazan & Singer, 2011).

    Update: ``s = s + g^2 ;  W = W - lr * g / sqrt(s + eps)`` (element-wise, ``s`` starting at zero).

    ``torch.optim.Adagrad`` puts ``eps`` outside the root, ``g / (sqrt(s) + eps)``; with
    ``eps=0, initial_accumulator_value=eps`` it computes exactly our ``sqrt(s + eps)``. We store the same
    thing: ``state["sum"]`` starts at ``eps`` and holds ``eps + sum g^2``, which saves one pass over the
    weights per step (so ``eps`` is fixed when the state is created). Tuning: ``lr`` around 0.01-0.1; the
    effective step only shrinks, so Adagrad suits sparse or convex problems.
    """

    state_names = ("sum",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        eps: float = 1e-8,
        *,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        flat: bool = False,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "eps": eps, "weight_decay": weight_decay, "foreach": foreach}, flat=flat
        )

    def _check_group(self, group) -> None:
        super()._check_group(group)
        check_nonnegative("eps", group["eps"], type(self).__name__, "use e.g. eps=1e-8")

    def _initial_state(self, group, param, state) -> None:
        state["sum"].fill_(group["eps"])  # holds eps + s

    def _single(self, group, param, grad, state) -> None:
        s_plus_eps = state["sum"]
        s_plus_eps.addcmul_(grad, grad)  # s = s + g^2
        param.addcdiv_(grad, s_plus_eps.sqrt(), value=-group["lr"])  # W -= lr*g/sqrt(s+eps)

    def _foreach(self, group, params, grads, states) -> None:
        sums = self._buffers(states, "sum")
        torch._foreach_addcmul_(sums, grads, grads)
        denominator = torch._foreach_sqrt(sums)
        torch._foreach_addcdiv_(params, grads, denominator, value=-group["lr"])


class RMSProp(FirstOrderOptimizer):
    """RMSProp (Tieleman & Hinton, 2012, Coursera lecture 6.5).

    Update: ``s = mu * s + (1 - mu) * g^2 ;  W = W - lr * g / (sqrt(s + eps) + eps)``.

    The double ``eps`` is neon's, which the overview follows. ``torch.optim.RMSprop(lr, alpha=mu,
    eps=eps)`` divides by ``sqrt(s) + eps``: the same trajectory up to ``eps`` inside the root, which is
    negligible only while ``s >> eps`` for every weight. Gradients of 1e-5 are common (``s ~ 1e-11``), so
    the trajectories agree to 1e-6 over 100 steps of a small tanh network with ``eps=1e-16`` but differ by
    2.6e-3 with ``eps=1e-10`` (tests/optim/test_against_torch.py). Tuning: ``mu`` 0.9-0.99, ``lr`` 1e-3.

    Implementation: ``state["square_avg_eps"]`` starts at ``eps`` and holds ``s + eps``, updated as
    ``lerp(s + eps, g^2 + eps, 1 - mu)`` (the same recurrence), so the root needs no extra pass. The
    batched path writes ``g^2 + eps`` and the denominator into one scratch list kept from step to step
    (:class:`~distlearn.optim.base.Workspace`) instead of two fresh lists per step.
    """

    state_names = ("square_avg_eps",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        decay: float = 0.9,
        eps: float = 1e-8,
        *,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = {"lr": lr, "decay": decay, "eps": eps, "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults, flat=flat)

    def _check_group(self, group) -> None:
        super()._check_group(group)
        check_unit_interval("decay", group["decay"], type(self).__name__, "use e.g. decay=0.9")
        check_nonnegative("eps", group["eps"], type(self).__name__, "use e.g. eps=1e-8")

    def _initial_state(self, group, param, state) -> None:
        state["square_avg_eps"].fill_(group["eps"])  # holds s + eps, s = 0

    def _single(self, group, param, grad, state) -> None:
        mu, eps = group["decay"], group["eps"]
        s_plus_eps = state["square_avg_eps"]
        s_plus_eps.mul_(mu).addcmul_(grad, grad, value=1 - mu).add_((1 - mu) * eps)  # s = mu*s + (1-mu)*g^2
        param.addcdiv_(grad, s_plus_eps.sqrt().add_(eps), value=-group["lr"])

    def _foreach(self, group, params, grads, states) -> None:
        mu, eps = group["decay"], group["eps"]
        s_plus_eps, s_flat = self._flat_state(group, "square_avg_eps", states)
        workspace = self._workspace(group, params, 1)  # no fresh tensors per step (see Workspace)
        (work,) = workspace.buffers
        workspace.fill(0, eps)
        torch._foreach_addcmul_(work, grads, grads)  # g^2 + eps
        torch._foreach_lerp_(s_plus_eps, work, 1 - mu)  # mu*(s + eps) + (1-mu)*(g^2 + eps)
        if s_flat is not None and workspace.flat[0] is not None:  # one kernel for the whole group
            torch.sqrt(s_flat, out=workspace.flat[0])
        else:
            torch._foreach_copy_(work, s_plus_eps)
            workspace.sqrt_(0)
        workspace.add_(0, eps)  # sqrt(s + eps) + eps
        torch._foreach_addcdiv_(params, grads, work, value=-group["lr"])


class Adadelta(FirstOrderOptimizer):
    """Adadelta (Zeiler, 2012).

    Update: ``l = mu * l + (1 - mu) * g^2 ;  dW = g * sqrt((d + eps) / (l + eps)) ;
    d = mu * d + (1 - mu) * dW^2 ;  W = W - lr * dW`` with ``lr = 1`` as in the paper.

    Exactly ``torch.optim.Adadelta(lr, rho=mu, eps=eps)``. Tuning: the paper's ``mu=0.95, eps=1e-6``; the
    step size grows from ``sqrt(eps)``, so a larger ``eps`` starts faster. The batched path writes
    ``d + eps`` and ``l + eps`` into two scratch lists kept from step to step
    (:class:`~distlearn.optim.base.Workspace`) instead of two fresh lists per step.
    """

    state_names = ("square_avg", "acc_delta")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        decay: float = 0.95,
        eps: float = 1e-6,
        *,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = {"lr": lr, "decay": decay, "eps": eps, "weight_decay": weight_decay, "foreach": foreach}
        super().__init__(params, defaults, flat=flat)

    def _check_group(self, group) -> None:
        super()._check_group(group)
        check_unit_interval("decay", group["decay"], type(self).__name__, "use e.g. decay=0.95")
        check_nonnegative("eps", group["eps"], type(self).__name__, "use e.g. eps=1e-6")

    def _single(self, group, param, grad, state) -> None:
        mu, eps = group["decay"], group["eps"]
        l, d = state["square_avg"], state["acc_delta"]
        l.mul_(mu).addcmul_(grad, grad, value=1 - mu)  # l = mu*l + (1-mu)*g^2
        delta = grad * ((d + eps) / (l + eps)).sqrt_()  # dW = g*sqrt((d+eps)/(l+eps))
        d.mul_(mu).addcmul_(delta, delta, value=1 - mu)  # d = mu*d + (1-mu)*dW^2
        param.sub_(delta, alpha=group["lr"])

    def _foreach(self, group, params, grads, states) -> None:
        mu, eps = group["decay"], group["eps"]
        (squares, l_flat), (deltas, d_flat) = (self._flat_state(group, n, states) for n in self.state_names)
        workspace = self._workspace(group, params, 2)  # no fresh tensors per step (see Workspace)
        ratio, squares_eps = workspace.buffers
        r_flat, q_flat = workspace.flat
        mu_list = workspace.constant(mu)
        flat = l_flat is not None and d_flat is not None and r_flat is not None and q_flat is not None
        if flat:  # the operations without g run as one kernel each
            l_flat.mul_(mu)
        else:
            torch._foreach_mul_(squares, mu_list)
        torch._foreach_addcmul_(squares, grads, grads, value=1 - mu)  # l = mu*l + (1-mu)*g^2
        if flat:
            torch.add(d_flat, eps, out=r_flat)  # d + eps
            torch.add(l_flat, eps, out=q_flat)  # l + eps
        else:
            torch._foreach_copy_(ratio, deltas)
            workspace.add_(0, eps)
            torch._foreach_copy_(squares_eps, squares)
            workspace.add_(1, eps)
        workspace.div_(0, 1)
        workspace.sqrt_(0)
        torch._foreach_mul_(ratio, grads)  # ratio is now dW
        if flat:
            d_flat.mul_(mu)
        else:
            torch._foreach_mul_(deltas, mu_list)
        torch._foreach_addcmul_(deltas, ratio, ratio, value=1 - mu)
        torch._foreach_add_(params, ratio, alpha=-group["lr"])


class Adam(FirstOrderOptimizer):
    """Adam (Kingma & Ba, 2015), in the paper's efficient form that the overview prints.

    Update: ``m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g^2 ;
    l = lr * sqrt(1 - b2^p) / (1 - b1^p) ;  W = W - l * m / (sqrt(v) + eps)``.

    ``p`` counts optimizer steps by default (``count="step"``, the paper and ``torch.optim``); the
    overview takes ``p`` to be the epoch (``count="epoch"``: ``p`` starts at 1 and :meth:`next_epoch`,
    which :func:`distlearn.train.train` calls after each epoch, increments it). With ``eps_hat=True``
    (default) ``eps`` is the paper's epsilon-hat of its section 2, added to ``sqrt(v)``; with
    ``eps_hat=False`` it is added to the bias-corrected ``sqrt(v / (1 - b2^p))`` as in the paper's
    Algorithm 1 and ``torch.optim.Adam``, which this then reproduces exactly. Tuning: ``lr`` 1e-3 (3e-4
    for large nets); rarely the betas.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        count: Literal["step", "epoch"] = "step",
        eps_hat: bool = True,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        flat: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "count": count,
            "eps_hat": eps_hat,
            "epoch": 1,
            "weight_decay": weight_decay,
            "foreach": foreach,
        }
        super().__init__(params, defaults, flat=flat)

    def _check_group(self, group) -> None:
        super()._check_group(group)
        name = type(self).__name__
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"{name}: betas must be a pair (b1, b2), got {betas!r}; use betas=(0.9, 0.999)")
        check_unit_interval("betas[0]", betas[0], name, "use e.g. betas=(0.9, 0.999)")
        check_unit_interval("betas[1]", betas[1], name, "use e.g. betas=(0.9, 0.999)")
        check_nonnegative("eps", group["eps"], name, "use e.g. eps=1e-8")
        if group["count"] not in ("step", "epoch"):
            raise ConfigError(f"{name}: count must be 'step' or 'epoch', got {group['count']!r}")

    def next_epoch(self) -> None:
        """Advance the epoch counter ``p`` used when ``count="epoch"`` (a no-op for ``count="step"``)."""
        for group in self.param_groups:
            group["epoch"] += 1

    @staticmethod
    def _scales(group: dict[str, Any], step: int) -> tuple[float, float]:
        """``(step size, eps)`` so that ``W -= step_size * m / (sqrt(v) + eps)`` is the update."""
        b1, b2 = group["betas"]
        p = step if group["count"] == "step" else group["epoch"]
        correction1, correction2 = 1 - b1**p, 1 - b2**p
        step_size = group["lr"] * math.sqrt(correction2) / correction1
        # Algorithm 1: m_hat / (sqrt(v_hat) + eps) = [sqrt(c2)/c1] * m / (sqrt(v) + eps*sqrt(c2)).
        eps = group["eps"] if group["eps_hat"] else group["eps"] * math.sqrt(correction2)
        return step_size, eps

    def _single(self, group, param, grad, state) -> None:
        b1, b2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1 - b1)  # m = b1*m + (1-b1)*g
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)  # v = b2*v + (1-b2)*g^2
        step_size, eps = self._scales(group, state["step"])  # l = lr*sqrt(1-b2^p)/(1-b1^p)
        param.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)  # W -= l*m/(sqrt(v)+eps)

    def _foreach(self, group, params, grads, states) -> None:
        b1, b2 = group["betas"]
        exp_avg, exp_avg_sq = self._buffers(states, "exp_avg"), self._buffers(states, "exp_avg_sq")
        torch._foreach_lerp_(exp_avg, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sq, b2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
        steps = {state["step"] for state in states}
        denominator = torch._foreach_sqrt(exp_avg_sq)
        if len(steps) == 1:  # the usual case: every tensor has taken the same number of steps
            step_size, eps = self._scales(group, steps.pop())
            torch._foreach_add_(denominator, eps)
            torch._foreach_addcdiv_(params, exp_avg, denominator, value=-step_size)
            return
        scales = [self._scales(group, state["step"]) for state in states]
        torch._foreach_add_(denominator, [eps for _, eps in scales])
        torch._foreach_addcdiv_(params, exp_avg, denominator, [-size for size, _ in scales])
