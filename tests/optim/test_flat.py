"""flat=True: parameters, gradients and state as views of one buffer per group, and the same trajectory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distlearn import optim
from distlearn.errors import ConfigError

METHODS = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam"]


def model_and_data(seed: int = 0, device: torch.device | str = "cpu"):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    ).double()
    x = torch.randn(30 * 16, 10, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return model.to(device), x.to(device), y.to(device)


def train(model, opt, x, y, steps=30, batch=16, zero=None):
    for t in range(steps):
        (zero or opt.zero_grad)()
        xb, yb = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def storage_of(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("name", METHODS)
def test_flat_path_equals_foreach_path(name, device):
    """On every device (tests/conftest.py); the same tolerance on CUDA (float64, the same kernels)."""
    results = []
    for flat in (False, True):
        model, x, y = model_and_data(seed=1, device=device)
        opt = optim.create(name, model.parameters(), flat=flat, weight_decay=1e-3)
        results.append(train(model, opt, x, y))
        if flat:  # every parameter, gradient and state buffer is a slice of one buffer per kind
            params = list(model.parameters())
            assert all(p.device.type == device.type and p.grad.device.type == device.type for p in params)
            assert len(storage_of(params)) == 1 and len(storage_of(p.grad for p in params)) == 1
            for buffer in type(opt).state_names:
                assert len(storage_of(opt.state[p][buffer] for p in params)) == 1
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-13)


def test_backward_accumulates_into_the_flat_gradient_and_replaced_gradients_are_taken_back():
    model, x, y = model_and_data(seed=2)
    reference = copy.deepcopy(model)
    opt = optim.create("momentum", model.parameters(), lr=0.05, flat=True)
    ref_opt = optim.create("momentum", reference.parameters(), lr=0.05)
    flat = opt._flat_groups[0]
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    assert flat.grad.abs().sum() > 0  # autograd wrote into the slices, in place
    assert all(
        p.grad.data_ptr() == flat.view(flat.grad, i).data_ptr() for i, p in enumerate(model.parameters())
    )
    opt.zero_grad()
    assert float(flat.grad.abs().sum()) == 0.0
    # model.zero_grad() sets grads to None: the next backward allocates new ones, the step copies them back
    a = train(model, opt, x, y, steps=10, zero=lambda: model.zero_grad(set_to_none=True))
    b = train(reference, ref_opt, x, y, steps=10)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert len(storage_of(p.grad for p in model.parameters())) == 1


def test_a_parameter_without_gradient_gets_a_zero_one():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = optim.create("sgd", [a, b], lr=0.1, flat=True)
    a.grad = torch.ones(3)
    b.grad = None
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and torch.equal(b.grad, torch.zeros(2))
    assert torch.allclose(a.detach(), torch.full((3,), 0.9))


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam"])
@pytest.mark.parametrize("saved_flat", [False, True], ids=["from-foreach", "from-flat"])
def test_state_dict_round_trip_into_a_flat_optimizer(name, saved_flat):
    model, x, y = model_and_data(seed=3)
    opt = optim.create(name, model.parameters(), flat=saved_flat)
    train(model, opt, x[:160], y[:160], steps=10)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight = train(model, opt, x[160:], y[160:], steps=10)

    resumed_model, _, _ = model_and_data(seed=99)
    resumed = optim.create(name, resumed_model.parameters(), flat=True)
    resumed_model.load_state_dict(saved_model)  # in place: the parameters stay slices of the flat buffer
    resumed.load_state_dict(saved_opt)
    params = list(resumed_model.parameters())
    for buffer in type(resumed).state_names:  # the loaded state was moved into the flat buffers
        assert len(storage_of(resumed.state[p][buffer] for p in params)) == 1
    again = train(resumed_model, resumed, x[160:], y[160:], steps=10)
    torch.testing.assert_close(straight, again, rtol=1e-12, atol=1e-13)


def test_a_checkpoint_with_the_older_velocity_state_loads_and_continues():
    """Momentum's state used to be ``velocity`` (v itself); such a checkpoint resumes the same trajectory."""
    for name in ("momentum", "nesterov"):
        model, x, y = model_and_data(seed=4)
        opt = optim.create(name, model.parameters(), lr=0.02)
        train(model, opt, x[:160], y[:160], steps=10)
        saved_model = copy.deepcopy(model.state_dict())
        old = copy.deepcopy(opt.state_dict())
        for index, p in enumerate(model.parameters()):
            entry = old["state"][index]
            entry["velocity"] = opt.velocity(p)
            del entry["velocity_direction"], entry["velocity_scale"]
        straight = train(model, opt, x[160:], y[160:], steps=10)
        resumed_model, _, _ = model_and_data(seed=98)
        resumed_model.load_state_dict(saved_model)
        resumed = optim.create(name, resumed_model.parameters(), lr=0.02)
        resumed.load_state_dict(old)
        again = train(resumed_model, resumed, x[160:], y[160:], steps=10)
        torch.testing.assert_close(straight, again, rtol=1e-10, atol=1e-12)


def test_flat_refuses_shared_memory_and_mixed_dtypes_with_the_fix():
    shared = nn.Linear(3, 2)
    shared.share_memory()
    with pytest.raises(ConfigError, match="shared memory.*flat=False"):
        optim.create("sgd", shared.parameters(), flat=True)
    mixed = [torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(ConfigError, match="its own param group"):
        optim.create("adam", mixed, flat=True)
    # in separate groups they are fine, each group flat on its own
    opt = optim.create("adam", [{"params": [mixed[0]]}, {"params": [mixed[1]]}], flat=True)
    assert len(opt._flat_groups) == 2


def test_a_group_without_any_gradient_is_skipped_as_without_flat():
    """A parameter-server worker clears every gradient after its server stepped: nothing may move then."""
    w = torch.ones(4, requires_grad=True)
    opt = optim.create("momentum", [w], lr=0.1, flat=True)
    w.grad = torch.ones(4)
    opt.step()
    after_one = w.detach().clone()
    w.grad = None
    opt.step()
    assert torch.equal(w.detach(), after_one)


def test_parameters_moved_into_shared_memory_after_flat_raise_instead_of_unsharing():
    from distlearn.parallel.hogwild import share_parameters

    model = nn.Linear(3, 2)
    opt = optim.create("sgd", model.parameters(), flat=True)
    share_parameters(list(model.parameters()))  # what the hogwild strategy does after the optimizer exists
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ConfigError, match="shared memory.*flat=False"):
        opt.step()


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_switching_a_flat_group_to_the_readable_path_mid_run_keeps_the_trajectory(name):
    """After the first flat step the group's step counts and scales are kept once for the group; the
    readable path (foreach=False) must find them in every parameter's state."""
    results = []
    for flat in (False, True):
        model, x, y = model_and_data(seed=5)
        opt = optim.create(name, model.parameters(), flat=flat)
        train(model, opt, x[:160], y[:160], steps=10)
        opt.param_groups[0]["foreach"] = False
        results.append(train(model, opt, x[160:], y[160:], steps=10))
        assert all(opt.state[p]["step"] == 20 for p in model.parameters())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-13)
