"""Every update rule against the overview's formula, worked here in plain Python on small tensors.

The expected numbers come from scalar arithmetic written in this file (``math`` on Python floats), not
from the code under test; the readable per-tensor path, the batched foreach path and the flat path must match.
"""

from __future__ import annotations

import math

import pytest
import torch

from distlearn import optim

# Two parameters of different shapes; a fixed gradient sequence per step (as if backward had produced it).
SHAPES = [(2, 3), (4,)]
STEPS = 6


def gradient(step: int, k: int, i: int) -> float:
    """The gradient entry i of parameter k at step t: varied signs and sizes, some exact zeros."""
    value = math.sin(1.7 * step + 0.9 * i + 2.3 * k) * (1 + 0.5 * k)
    return 0.0 if (step + i) % 5 == 0 else value


def initial(k: int, i: int) -> float:
    return 0.1 * (i + 1) * (-1) ** (i + k)


def run_ours(name: str, foreach: bool | str, **hyper) -> list[list[float]]:
    """``foreach`` is False, True, or "flat" (the batched path on one flat buffer per group)."""
    params = [
        torch.tensor([initial(k, i) for i in range(math.prod(s))], dtype=torch.float64).reshape(s)
        .requires_grad_(True)
        for k, s in enumerate(SHAPES)
    ]  # fmt: skip
    if foreach == "flat":
        opt = optim.create(name, params, flat=True, **hyper)
    else:
        opt = optim.create(name, params, foreach=foreach, **hyper)
    for t in range(1, STEPS + 1):
        for k, p in enumerate(params):
            p.grad = torch.tensor([gradient(t, k, i) for i in range(p.numel())], dtype=torch.float64).reshape(
                p.shape
            )
        opt.step()
    return [p.detach().reshape(-1).tolist() for p in params]


def run_hand(update, state_init) -> list[list[float]]:
    """Apply the scalar ``update(w, g, state, t) -> w`` entry by entry."""
    out = []
    for k, shape in enumerate(SHAPES):
        row = []
        for i in range(math.prod(shape)):
            w, state = initial(k, i), dict(state_init)
            for t in range(1, STEPS + 1):
                w = update(w, gradient(t, k, i), state, t)
            row.append(w)
        out.append(row)
    return out


def sgd(lr):
    def update(w, g, s, t):
        return w - lr * g

    return update


def momentum(lr, mu):
    def update(w, g, s, t):
        s["v"] = mu * s["v"] + lr * g
        return w - s["v"]

    return update


def nesterov(lr, mu):
    def update(w, g, s, t):
        v_new = mu * s["v"] - lr * g
        w = w - mu * s["v"] + (1 + mu) * v_new
        s["v"] = v_new
        return w

    return update


def adagrad(lr, eps):
    def update(w, g, s, t):
        s["s"] += g * g
        return w - lr * g / math.sqrt(s["s"] + eps)

    return update


def rmsprop(lr, mu, eps):
    def update(w, g, s, t):
        s["s"] = mu * s["s"] + (1 - mu) * g * g
        return w - lr * g / (math.sqrt(s["s"] + eps) + eps)

    return update


def adadelta(lr, mu, eps):
    def update(w, g, s, t):
        s["l"] = mu * s["l"] + (1 - mu) * g * g
        dw = g * math.sqrt((s["d"] + eps) / (s["l"] + eps))
        s["d"] = mu * s["d"] + (1 - mu) * dw * dw
        return w - lr * dw

    return update


def adam(lr, b1, b2, eps, eps_hat=True):
    def update(w, g, s, t):
        s["m"] = b1 * s["m"] + (1 - b1) * g
        s["v"] = b2 * s["v"] + (1 - b2) * g * g
        if eps_hat:
            step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            return w - step * s["m"] / (math.sqrt(s["v"]) + eps)
        m_hat, v_hat = s["m"] / (1 - b1**t), s["v"] / (1 - b2**t)  # the paper's Algorithm 1
        return w - lr * m_hat / (math.sqrt(v_hat) + eps)

    return update


CASES = [
    ("sgd", {"lr": 0.1}, sgd(0.1), {}),
    ("momentum", {"lr": 0.1, "momentum": 0.8}, momentum(0.1, 0.8), {"v": 0.0}),
    ("nesterov", {"lr": 0.1, "momentum": 0.8}, nesterov(0.1, 0.8), {"v": 0.0}),
    ("adagrad", {"lr": 0.3, "eps": 1e-3}, adagrad(0.3, 1e-3), {"s": 0.0}),
    ("rmsprop", {"lr": 0.01, "decay": 0.7, "eps": 1e-3}, rmsprop(0.01, 0.7, 1e-3), {"s": 0.0}),
    ("adadelta", {"lr": 1.0, "decay": 0.6, "eps": 1e-2}, adadelta(1.0, 0.6, 1e-2), {"l": 0.0, "d": 0.0}),
    (
        "adam",
        {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3},
        adam(0.05, 0.8, 0.9, 1e-3),
        {"m": 0.0, "v": 0.0},
    ),
    (
        "adam",
        {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "eps_hat": False},
        adam(0.05, 0.8, 0.9, 1e-3, eps_hat=False),
        {"m": 0.0, "v": 0.0},
    ),
]


@pytest.mark.parametrize("foreach", [False, True, "flat"], ids=["per-tensor", "foreach", "flat"])
@pytest.mark.parametrize(
    ("name", "hyper", "update", "state"), CASES, ids=[c[0] for c in CASES[:-1]] + ["adam-alg1"]
)
def test_update_matches_hand_computation(name, hyper, update, state, foreach):
    expected = run_hand(update, state)
    got = run_ours(name, foreach, **hyper)
    for row_got, row_expected in zip(got, expected, strict=True):
        assert row_got == pytest.approx(row_expected, rel=1e-12, abs=1e-14)


def test_weight_decay_adds_l2_gradient():
    lr, wd = 0.1, 0.5
    expected = run_hand(lambda w, g, s, t: w - lr * (g + wd * w), {})
    for foreach in (False, True, "flat"):
        got = run_ours("sgd", foreach, lr=lr, weight_decay=wd)
        for row_got, row_expected in zip(got, expected, strict=True):
            assert row_got == pytest.approx(row_expected, rel=1e-12)


def test_adam_epoch_count_uses_the_epoch_in_bias_correction():
    """count='epoch': p is the epoch (the overview's reading), advanced by next_epoch()."""
    lr, b1, b2, eps = 0.05, 0.8, 0.9, 1e-3
    w = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    opt = optim.Adam([w], lr=lr, betas=(b1, b2), eps=eps, count="epoch")
    grads = [0.3, -0.2, 0.7, 0.1]
    expected, m, v = 0.5, 0.0, 0.0
    for step, g in enumerate(grads):
        epoch = 1 + step // 2  # two steps per epoch
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected -= lr * math.sqrt(1 - b2**epoch) / (1 - b1**epoch) * m / (math.sqrt(v) + eps)
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        if step % 2 == 1:
            opt.next_epoch()
    assert w.item() == pytest.approx(expected, rel=1e-12)


def test_parameters_without_gradient_are_left_alone():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = optim.create("adam", [a, b])
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3))


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
@pytest.mark.parametrize("path", [False, True, "flat"], ids=["per-tensor", "foreach", "flat"])
def test_momentum_rules_under_a_changing_learning_rate(name, path):
    """The stored velocity is a scale times a direction; under an lr schedule that starts at 0 (the scale
    is 0 then) and jumps, the weights still follow v = mu*v + lr_t*g (Nesterov: v = mu*v - lr_t*g)."""
    mu, lrs = 0.8, [0.0, 0.0, 0.1, 0.3, 0.05, 0.0, 0.2]
    grads = [0.4, -1.1, 0.7, 0.25, -0.6, 0.9, 0.3]
    w_hand, v = 0.5, 0.0
    for lr, g in zip(lrs, grads, strict=True):
        if name == "momentum":
            v = mu * v + lr * g
            w_hand -= v
        else:
            v_new = mu * v - lr * g
            w_hand += -mu * v + (1 + mu) * v_new
            v = v_new
    w = torch.tensor([0.5, -0.25], dtype=torch.float64, requires_grad=True)
    opt = optim.create(name, [w], momentum=mu, **({"flat": True} if path == "flat" else {"foreach": path}))
    for lr, g in zip(lrs, grads, strict=True):
        opt.param_groups[0]["lr"] = lr
        w.grad = torch.tensor([g, 0.0], dtype=torch.float64)
        opt.step()
    assert w[0].item() == pytest.approx(w_hand, rel=1e-12)
    assert w[1].item() == -0.25
    assert opt.velocity(w)[0].item() == pytest.approx(v, rel=1e-12)
