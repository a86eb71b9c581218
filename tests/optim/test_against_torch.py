"""Our optimizers against torch.optim on a real model, the fast path against the readable one, and
the Optimizer contract (param groups, state_dict, errors).

The comparisons run on every ``device`` (tests/conftest.py): on the CPU always, on CUDA where a GPU is
visible. Tolerances are the CPU's on CUDA too, except that "exact" equivalents are held to 1e-7 there
instead of 1e-9: CUDA's compiler fuses a multiply and an add into one rounding (FMA) in some kernels and
not in others, so two formulas equal on paper round differently.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distlearn import optim
from distlearn.errors import ConfigError

# Hyper-parameters chosen so that every method moves the weights noticeably within 100 steps.
SETTINGS = {
    "sgd": {"lr": 0.05},
    "momentum": {"lr": 0.02, "momentum": 0.9},
    "nesterov": {"lr": 0.02, "momentum": 0.9},
    "adagrad": {"lr": 0.05, "eps": 1e-8},
    "rmsprop": {"lr": 1e-3, "decay": 0.9, "eps": 1e-20},
    "adadelta": {"lr": 1.0, "decay": 0.9, "eps": 1e-6},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "eps_hat": False},
    "adam-eps-hat": {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-10},
}


def model_and_data(seed: int = 0, device: torch.device | str = "cpu"):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    ).double()
    x = torch.randn(100 * 16, 10, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return model.to(device), x.to(device), y.to(device)


def train(model, opt, x, y, steps=100, batch=16):
    trajectory = []
    for t in range(steps):
        xb, yb = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return trajectory


@pytest.mark.parametrize("key", list(SETTINGS))
def test_trajectory_matches_torch_optim_for_100_steps(key, device):
    name = key.removesuffix("-eps-hat")
    hyper = SETTINGS[key]
    ours_model, x, y = model_and_data(device=device)
    theirs_model = copy.deepcopy(ours_model)
    ours = optim.create(name, ours_model.parameters(), **hyper)
    equivalent = optim.torch_equivalent(name, **hyper)
    theirs = equivalent.create(theirs_model.parameters())
    assert isinstance(theirs, torch.optim.Optimizer) and type(theirs).__module__.startswith("torch.optim")
    a, b = train(ours_model, ours, x, y), train(theirs_model, theirs, x, y)
    assert a[-1].device.type == device.type and all(
        state.device.type == device.type for group in ours.state.values() for state in group.values()
        if isinstance(state, torch.Tensor)
    ), "the optimizer's state must live on the parameters' device"
    start = torch.cat([p.detach().reshape(-1) for p in model_and_data(device=device)[0].parameters()])
    assert (a[-1] - start).abs().max() > 1e-3, "the weights must move for the comparison to mean something"
    worst = max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))
    assert worst <= 1e-6, f"{key}: trajectories differ by {worst:.2e}"
    if equivalent.exact:
        assert worst <= (1e-9 if device.type == "cpu" else 1e-7)


def test_torch_equivalent_rejects_cg_and_epoch_counting():
    with pytest.raises(ConfigError, match="scipy"):
        optim.torch_equivalent("cg-fr")
    with pytest.raises(ConfigError, match="count='step'"):
        optim.torch_equivalent("adam", count="epoch")


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam"])
def test_foreach_path_equals_per_tensor_path(name, device):
    runs = []
    for foreach in (False, True):
        model, x, y = model_and_data(seed=1, device=device)
        opt = optim.create(name, model.parameters(), foreach=foreach, weight_decay=1e-3)
        runs.append(train(model, opt, x, y, steps=30))
    for u, v in zip(*runs, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["momentum", "adam", "rmsprop"])
def test_param_groups_take_their_own_hyperparameters(name, device):
    model, x, y = model_and_data(seed=2, device=device)
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = optim.create(name, [{"params": first, "lr": 0.0}, {"params": rest}], lr=1e-2)
    before = [p.detach().clone() for p in first]
    train(model, opt, x, y, steps=5)
    assert all(torch.equal(p.detach(), q) for p, q in zip(first, before, strict=True)), (
        "lr=0 group must not move"
    )
    with pytest.raises(ConfigError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "cg-hs"])
def test_state_dict_round_trip_continues_the_same_trajectory(name, device):
    model, x, y = model_and_data(seed=3, device=device)
    hyper = {"line_search": None, "lr": 0.01} if name.startswith("cg") else {}
    opt = optim.create(name, model.parameters(), **hyper)
    train(model, opt, x[:160], y[:160], steps=10)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight = train(model, opt, x[160:], y[160:], steps=10)

    resumed_model, _, _ = model_and_data(seed=99, device=device)
    resumed_model.load_state_dict(saved_model)
    resumed = optim.create(name, resumed_model.parameters(), **hyper)
    resumed.load_state_dict(saved_opt)
    again = train(resumed_model, resumed, x[160:], y[160:], steps=10)
    assert torch.equal(straight[-1], again[-1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: optim.create("adamax", p), "unknown optimizer 'adamax'; choose one of: sgd"),
        (lambda p: optim.create("sgd", p, lr=-0.1), "lr must be a finite number >= 0"),
        (lambda p: optim.create("adam", p, eps=-1e-8), "eps must be a finite number >= 0"),
        (lambda p: optim.create("rmsprop", p, eps=-1.0), "eps must be"),
        (lambda p: optim.create("momentum", p, momentum=1.0), r"momentum must lie in \[0, 1\)"),
        (lambda p: optim.create("adam", p, betas=(0.9, 1.5)), r"betas\[1\] must lie"),
        (lambda p: optim.create("adam", p, count="epochs"), "count must be 'step' or 'epoch'"),
        (lambda p: optim.create("sgd", p, momentum=0.9), "unexpected keyword argument 'momentum'"),
        (lambda p: optim.create("cg-fr", p, line_search="armijo"), "unknown line_search"),
        (lambda p: optim.create("cg-hs", p, lr=-1), "lr must be"),
        (lambda p: optim.create("sgd", p, lr=float("nan")), "lr must be a finite number"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call([torch.zeros(2, requires_grad=True)])


def test_cg_with_line_search_requires_a_closure():
    w = torch.zeros(2, requires_grad=True)
    opt = optim.create("cg-fr", [w])
    (w - 1).pow(2).sum().backward()
    with pytest.raises(ConfigError, match=r"needs a closure: call optimizer.step\(closure\)"):
        opt.step()
    assert optim.needs_closure("cg-fr") and optim.needs_closure("cg-hs") and not optim.needs_closure("adam")


def test_sparse_gradients_are_refused_with_a_pointer():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = optim.create("adam", embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ConfigError, match="sparse"):
        opt.step()
