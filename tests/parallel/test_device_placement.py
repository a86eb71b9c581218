"""``parallelize(..., device=)``: the replica computes where the model is, and ``device=`` must agree (DDP's
rule: the module on its device before it is wrapped). Under plain python (a one-process group)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distlearn
from distlearn.errors import ConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def model_and_optimizer(device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: str) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def check_against_one_process(device: str) -> None:
    """sync with R = 1 on ``device``: the step of the plain loop on the same device (the mean of one)."""
    if dist.is_initialized():
        pytest.skip("a process group exists in this process already")
    model, optimizer = model_and_optimizer(device)
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    model, optimizer = distlearn.parallelize(model, optimizer, "sync", device=device)
    strategy = optimizer.distlearn_strategy
    try:
        assert strategy.device == next(model.parameters()).device
        assert dist.get_backend() == ("nccl" if device.startswith("cuda") else "gloo")
        one_step(model, optimizer, device)
        one_step(reference, reference_optimizer, device)
        for got, expected in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(got, expected)
    finally:
        strategy.close()
    assert not dist.is_initialized()  # the one-process group made here is gone


@pytest.mark.timeout(120)
def test_parallelize_on_the_cpu_follows_the_model():
    check_against_one_process("cpu")


@pytest.mark.timeout(120)
@pytest.mark.gpu
@needs_cuda
def test_parallelize_on_cuda_uses_nccl_and_takes_the_plain_step():
    check_against_one_process("cuda:0")


def test_device_elsewhere_than_the_model_is_refused_before_joining(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch sees a GPU (in this process)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    model, optimizer = model_and_optimizer("cpu")
    already = dist.is_initialized()
    with pytest.raises(ConfigError) as caught:
        distlearn.parallelize(model, optimizer, "sync", device="cuda")
    message = str(caught.value)
    assert "cuda:0" in message and "the model is on cpu" in message and "model.to('cuda:0')" in message
    assert dist.is_initialized() == already  # refused before any group was made
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing moved behind the optimizer


def test_optimizer_state_on_another_device_is_refused():
    model, optimizer = model_and_optimizer("cpu")
    first = next(model.parameters())
    optimizer.state[first]["momentum_buffer"] = torch.empty(first.shape, device="meta")  # not the model's
    with pytest.raises(ConfigError, match="'momentum_buffer' is on meta but the model is on cpu"):
        distlearn.parallelize(model, optimizer, "sync")
