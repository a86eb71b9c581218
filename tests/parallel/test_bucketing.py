"""Bucket planning and the bucketer's bookkeeping, in one process (world size 1 needs no peers).

The bookkeeping runs on every ``device`` (tests/conftest.py): the buckets' buffers live on the parameters'
device, and the gradients come back there unchanged (exactly, on CUDA too: nothing is summed).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distlearn.comm.bucketing import GradientBucketer, plan_buckets
from distlearn.errors import ConfigError


def tensors(*sizes, dtype=torch.float32, device="cpu"):
    return [torch.zeros(n, dtype=dtype, device=device, requires_grad=True) for n in sizes]


def test_plan_packs_greedily_and_keeps_big_tensors_alone():
    params = tensors(10, 10, 30, 5, 100, 1)
    plan = plan_buckets(params, bucket_bytes=4 * 25)  # 25 floats per bucket
    assert [[p.numel() for p in bucket] for bucket in plan] == [[10, 10], [30], [5], [100], [1]]
    assert [p for bucket in plan for p in bucket] == params  # order kept, nothing lost


def test_plan_never_mixes_dtypes_and_zero_means_one_tensor_per_bucket():
    mixed = tensors(3, 3) + tensors(3, dtype=torch.float64) + tensors(3)
    assert [len(b) for b in plan_buckets(mixed, bucket_bytes=1 << 20)] == [2, 1, 1]
    assert [len(b) for b in plan_buckets(tensors(1, 2, 3), bucket_bytes=0)] == [1, 1, 1]
    with pytest.raises(ConfigError, match="bucket size"):
        plan_buckets(tensors(1), bucket_bytes=-1)


class SummingReducer:
    """A reducer for a group of one: the sum over one rank is the tensor itself; records the calls."""

    name = "identity"

    def __init__(self):
        self.calls = []

    def allreduce_(self, tensor, group=None):
        self.calls.append(("sync", tensor.numel()))
        return tensor

    def allreduce_async(self, tensor, group=None):
        self.calls.append(("async", tensor.numel()))
        future = torch.futures.Future()
        future.set_result(tensor)
        return future


@pytest.mark.parametrize("overlap", [True, False])
def test_buckets_go_in_reverse_registration_order_and_gradients_come_back(overlap, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    reducer = SummingReducer()
    bucketer = GradientBucketer(
        model.parameters(), reducer, world_size=1, bucket_bytes=4 * 30, overlap=overlap
    )
    # reverse order: bias(3), weight(24) | bias(8) | weight(32)
    assert [[p.numel() for p in b.params] for b in bucketer.buckets] == [[3, 24], [8], [32]]
    assert all(b.buffer.device.type == device.type for b in bucketer.buckets)
    model(torch.randn(5, 4).to(device)).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    if overlap:  # launched from the hooks during backward, in bucket order
        assert reducer.calls == [("async", 27), ("async", 8), ("async", 32)]
    bucketer.finish()
    if not overlap:
        assert reducer.calls == [("sync", 27), ("sync", 8), ("sync", 32)]
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, g)
    bucketer.close()


def test_a_parameter_without_gradient_contributes_zeros(device):
    a, b, c = tensors(3, 4, 5, device=device)
    reducer = SummingReducer()
    bucketer = GradientBucketer([a, b, c], reducer, world_size=1, bucket_bytes=4 * 9, overlap=True)
    assert bucketer.overlap and len(bucketer.buckets) == 2
    (a * 2).sum().backward()  # b and c get no gradient this step
    assert reducer.calls == []  # the buckets are incomplete, nothing launched yet
    bucketer.finish()
    assert torch.equal(a.grad.cpu(), torch.full((3,), 2.0)) and torch.equal(b.grad.cpu(), torch.zeros(4))
    assert torch.equal(c.grad.cpu(), torch.zeros(5)) and c.grad.device.type == device.type


def test_one_bucket_registers_no_hooks_and_reduces_in_finish(device):
    a, b = tensors(3, 4, device=device)
    reducer = SummingReducer()
    bucketer = GradientBucketer([a, b], reducer, world_size=2, bucket_bytes=1 << 20, overlap=True)
    assert not bucketer.overlap and bucketer.requested_overlap and bucketer._handles == []
    assert "overlap off (one bucket)" in bucketer.describe()
    (a * 2).sum().backward()
    assert reducer.calls == []
    bucketer.finish()
    assert len(reducer.calls) == 1
    assert torch.equal(a.grad.cpu(), torch.full((3,), 1.0)) and torch.equal(b.grad.cpu(), torch.zeros(4))
