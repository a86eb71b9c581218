"""The batched path's scratch lists (Workspace): reused across steps, never saved, rebuilt when needed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from distlearn import optim
from distlearn.optim.base import Workspace

USERS = ["rmsprop", "adadelta"]  # the methods whose batched step writes into a Workspace


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2)).double()
    x = torch.randn(20 * 8, 6, dtype=torch.float64)
    y = torch.randn(20 * 8, 2, dtype=torch.float64)
    return model, x, y


def run(model, opt, x, y, steps=20, batch=8):
    for t in range(steps):
        opt.zero_grad()
        xb, yb = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def scratch_pointers(opt) -> list[int]:
    return [t.data_ptr() for ws in opt._workspaces.values() for buffers in ws.buffers for t in buffers]


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name", USERS)
def test_the_same_scratch_tensors_serve_every_step_and_are_not_saved(name, flat):
    model, x, y = model_and_data()
    opt = optim.create(name, model.parameters(), flat=flat)
    run(model, opt, x, y, steps=1)
    first = scratch_pointers(opt)
    assert first, "the batched step made no workspace"
    run(model, opt, x, y, steps=5)
    assert scratch_pointers(opt) == first  # no fresh scratch tensors after the first step
    saved = opt.state_dict()["state"]
    names = {key for state in saved.values() for key in state}
    assert names <= {"step", *type(opt).state_names}, names


@pytest.mark.parametrize("name", USERS)
def test_a_copy_or_a_pickled_optimizer_without_its_workspace_continues_bit_identically(name):
    model, x, y = model_and_data(seed=3)
    opt = optim.create(name, model.parameters())
    run(model, opt, x, y, steps=5)
    twin_model = copy.deepcopy(model)
    twin = optim.create(name, twin_model.parameters())
    twin.load_state_dict(pickle.loads(pickle.dumps(opt.state_dict())))
    del opt.__dict__["_workspaces"]  # as after unpickling the optimizer itself
    torch.testing.assert_close(run(model, opt, x, y), run(twin_model, twin, x, y), rtol=0, atol=0)


@pytest.mark.parametrize("name", USERS)
def test_a_changing_set_of_parameters_gets_matching_scratch_and_the_readable_paths_result(name):
    """Missing gradients change the stepped list; an added group gets its own workspace."""
    results = []
    for foreach in (True, False):
        model, x, y = model_and_data(seed=4)
        first, second = model[0], model[2]
        opt = optim.create(name, first.parameters(), foreach=foreach)
        for t in range(12):
            if t == 4:
                opt.add_param_group({"params": list(second.parameters())})
            opt.zero_grad()
            second.zero_grad()
            nn.functional.mse_loss(model(x[t * 8 : (t + 1) * 8]), y[t * 8 : (t + 1) * 8]).backward()
            if t % 3 == 0:
                first.bias.grad = None  # this step the group's list has one tensor fewer
            opt.step()
        if foreach:
            assert len(opt._workspaces) == 2  # one per group, the stale lists dropped
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-13)


def test_constants_are_exact_and_take_no_memory():
    params = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5), torch.zeros(2, 2)]
    constants = Workspace(("key",), params, 1).constant(0.1)
    assert [c.shape for c in constants] == [p.shape for p in params]
    assert [c.dtype for c in constants] == [p.dtype for p in params]
    assert all(c.stride() == (0,) * c.dim() for c in constants)
    xs = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5), torch.randn(2, 2)]
    ys = [x.clone() for x in xs]
    torch._foreach_mul_(xs, constants)
    torch._foreach_mul_(ys, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(xs, ys, strict=True))


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float64, torch.float32, torch.float32)])
def test_scratch_operations_equal_the_list_operations_with_one_buffer_or_one_per_tensor(dtypes):
    """One dtype: the scratch lists are views of one tensor per list; mixed dtypes: separate tensors."""
    shapes = [(3, 4), (5,), (2, 2)]
    params = [torch.zeros(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    ws = Workspace(("key",), params, 2)
    assert (ws.flat[0] is not None) == (len(set(dtypes)) == 1)
    assert [b.shape for b in ws.buffers[1]] == [p.shape for p in params]
    ws.buffers[0][0].fill_(float("nan"))
    ws.fill(0, 0.3)
    assert all(torch.equal(b, torch.full_like(p, 0.3)) for b, p in zip(ws.buffers[0], params, strict=True))
    a = [torch.rand(shape, dtype=dtype) + 0.5 for shape, dtype in zip(shapes, dtypes, strict=True)]
    b = [torch.rand(shape, dtype=dtype) + 0.5 for shape, dtype in zip(shapes, dtypes, strict=True)]
    torch._foreach_copy_(ws.buffers[0], a)
    torch._foreach_copy_(ws.buffers[1], b)
    ws.add_(0, 1e-3)
    ws.div_(0, 1)
    ws.sqrt_(0)
    expected = torch._foreach_sqrt(torch._foreach_div(torch._foreach_add(a, 1e-3), b))
    assert all(torch.equal(x, y) for x, y in zip(ws.buffers[0], expected, strict=True))


@pytest.mark.parametrize("name", USERS)
def test_state_moves_into_one_tensor_unless_it_is_in_shared_memory(name):
    model, x, y = model_and_data(seed=5)
    opt = optim.create(name, model.parameters())
    run(model, opt, x, y, steps=2)
    params = list(model.parameters())
    for buffer in type(opt).state_names:
        storages = {opt.state[p][buffer].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1  # views of one tensor: the state-only operations are one kernel
    twin_model = copy.deepcopy(model)
    twin = optim.create(name, twin_model.parameters())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.testing.assert_close(run(model, opt, x, y), run(twin_model, twin, x, y), rtol=0, atol=0)

    shared_model, _, _ = model_and_data(seed=5)
    shared = optim.create(name, shared_model.parameters())
    run(shared_model, shared, x, y, steps=1)
    for state in shared.state.values():
        for buffer in type(shared).state_names:
            state[buffer] = state[buffer].clone().share_memory_()  # as the A3C workers' statistics
    kept = {id(state[buffer]) for state in shared.state.values() for buffer in type(shared).state_names}
    run(shared_model, shared, x, y, steps=2)
    after = {id(state[buffer]) for state in shared.state.values() for buffer in type(shared).state_names}
    assert after == kept  # still the shared tensors, which other processes update


@pytest.mark.parametrize("name", USERS)
def test_a_flat_group_stepped_per_parameter_keeps_its_state_in_the_flat_buffers(name):
    """Step counts that differ across the group (a loaded checkpoint) make a flat group step per parameter."""
    model, x, y = model_and_data(seed=6)
    plain = optim.create(name, model.parameters())
    run(model, plain, x, y, steps=2)
    model[0].bias.grad = None  # one parameter misses a step: its step count falls behind
    plain.step()
    flat_model = copy.deepcopy(model)
    flat = optim.create(name, flat_model.parameters(), flat=True)
    flat.load_state_dict(copy.deepcopy(plain.state_dict()))
    torch.testing.assert_close(run(flat_model, flat, x, y), run(model, plain, x, y), rtol=1e-12, atol=1e-13)
    buffers = flat._flat_groups[0].buffers
    for p in flat_model.parameters():
        for buffer in type(flat).state_names:
            assert flat.state[p][buffer].untyped_storage().data_ptr() == buffers[buffer].data_ptr()
