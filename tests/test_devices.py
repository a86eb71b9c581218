"""distlearn.devices and the device rules of the strategies: ``--device auto|cpu|cuda``, the backend, the
batch copies, and the strategies that refuse CUDA before any process starts.

On a machine without CUDA, the cases that need torch to *see* GPUs (LOCAL_RANK -> cuda:k, the strategies'
refusals behind the availability check) patch ``torch.cuda.is_available`` / ``device_count`` in this
process only: nothing in them touches a GPU. The ``gpu`` tests run the same functions on a real device.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from distlearn import devices
from distlearn.devices import backend_for, resolve_device, to_device, to_host
from distlearn.errors import ConfigError
from distlearn.launch import free_port, init_distributed, shutdown
from distlearn.parallel import create_strategy
from distlearn.parallel.easgd import EASGDOptions
from distlearn.parallel.hogwild import HogwildOptions
from distlearn.train import TrainConfig
from distlearn.train.config import validate_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without CUDA")


@pytest.fixture
def two_gpus_seen(monkeypatch):
    """torch says it sees two CUDA devices (in this process only; nothing below allocates on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# -- resolve_device ----------------------------------------------------------------------------------------


def test_auto_is_cuda_of_the_local_rank_where_torch_sees_cuda_else_the_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@no_cuda_here
def test_cuda_without_cuda_is_refused_naming_the_fix():
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda")
    message = str(caught.value)
    assert "--device cuda" in message and "--device cpu" in message
    assert "no CUDA" in message or "finds no CUDA device" in message


def test_cuda_takes_the_gpu_of_local_rank(monkeypatch, two_gpus_seen):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)  # an explicit local rank wins
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index too
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_a_local_rank_beyond_the_gpus_is_refused_unless_ranks_share_them(monkeypatch, two_gpus_seen):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda")
    message = str(caught.value)
    assert "LOCAL_RANK 2" in message and "cuda:2" in message and "2 CUDA device(s)" in message
    assert "--nproc-per-node" in message
    # the parameter server's ranks may share a GPU (its servers compute nothing on it)
    assert resolve_device("cuda", shared=True) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda", shared=True) == torch.device("cuda", 1)


@pytest.mark.parametrize("spec", ["tpu", "mps", "gpu0", ""])
def test_other_devices_are_refused(spec):
    with pytest.raises(ConfigError, match="cpu"):
        resolve_device(spec)


def test_a_bad_local_rank_is_named(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError, match="LOCAL_RANK='x'"):
        resolve_device("cpu")


def test_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(None) == "gloo"
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for("cuda") == "nccl"


# -- moving data ---------------------------------------------------------------------------------------------


def test_to_device_cpu_returns_the_same_tensors_and_to_host_copies_only_device_tensors():
    x, y = torch.randn(4, 3), torch.arange(4)
    moved = to_device((x, [y], {"y": y}), torch.device("cpu"))
    assert moved[0] is x and moved[1][0] is y and moved[2]["y"] is y  # no copy, no pinning on the CPU
    state = {"a": x, "b": [y, 3, "s"], "c": (x,), "d": None}
    host = to_host(state)
    assert host["a"] is x and host["b"][0] is y and host["b"][1:] == [3, "s"] and host["c"][0] is x
    assert host["d"] is None


def test_cuda_rng_helpers_do_nothing_on_the_cpu():
    assert devices.cuda_rng_state(torch.device("cpu")) is None
    devices.set_cuda_rng_state(torch.zeros(8, dtype=torch.uint8), torch.device("cpu"))  # no error


@pytest.mark.gpu
@needs_cuda
def test_to_device_pins_and_copies_to_cuda_and_back():
    device = resolve_device("cuda", 0)
    x, y = torch.randn(64, 3), torch.arange(64)
    gx, gy = to_device((x, y), device)
    assert gx.device == device and gy.device == device
    assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    assert to_device(gx, device) is gx
    back = to_host({"x": gx, "n": 1})
    assert back["x"].device.type == "cpu" and torch.equal(back["x"], x)
    state = devices.cuda_rng_state(device)
    first = torch.rand(4, device=device)
    devices.set_cuda_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), first)


# -- init_distributed: the backend of the device, not of the machine ---------------------------------------


@pytest.mark.timeout(60)
def test_init_distributed_uses_gloo_for_cpu_tensors_even_where_cuda_is_visible(monkeypatch):
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process already")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # before: NCCL whenever CUDA was visible
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    try:
        context = init_distributed(timeout_s=30)  # no device: the caller's tensors are CPU tensors
        assert context.backend == "gloo" and torch.distributed.get_backend() == "gloo"
    finally:
        shutdown()
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        context = init_distributed(timeout_s=30, device=torch.device("cpu"))
        assert context.backend == "gloo"
    finally:
        shutdown()
    assert not torch.distributed.is_initialized()
    assert os.environ["LOCAL_RANK"] == "0"


# -- strategies that cannot use CUDA ---------------------------------------------------------------------


def test_hogwild_and_async_easgd_say_why_they_refuse_cuda():
    assert "shared CPU memory" in HogwildOptions().cuda_refusal()
    assert "--device cpu" in HogwildOptions().cuda_refusal()
    assert "--easgd-mode sync" in EASGDOptions(easgd_mode="async").cuda_refusal()
    assert EASGDOptions(easgd_mode="sync").cuda_refusal() == ""


@pytest.mark.parametrize(
    "strategy,values,words",
    [
        ("hogwild", {"workers": 2}, "shared CPU memory"),
        ("easgd", {"workers": 3, "easgd_mode": "async"}, "--easgd-mode sync"),
    ],
)
def test_cuda_is_refused_before_launch_for_strategies_on_the_cpu(two_gpus_seen, strategy, values, words):
    config = TrainConfig.build(strategy=strategy, optimizer="sgd", lr=0.05, device="cuda", **values)
    with pytest.raises(ConfigError) as caught:
        validate_config(config)  # what the command line runs before it starts any process
    assert "--device cuda" in str(caught.value) and words in str(caught.value)
    # auto, with GPUs in sight, means the CPU for them; sync EASGD and sync keep the GPU
    auto = create_strategy(strategy, **{k: v for k, v in values.items() if k != "workers"})
    assert auto.place("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda"):
        auto.place("cuda")


def test_strategies_that_can_use_cuda_pass_the_check(two_gpus_seen, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    cases = (("sync", {}), ("easgd", {"easgd_mode": "sync"}), ("local-sgd", {}), ("ddp", {}))
    for strategy, options in cases:
        config = TrainConfig.build(
            strategy=strategy, optimizer="sgd", lr=0.05, device="cuda", workers=2, **options
        )
        validate_config(config)
        chosen = create_strategy(strategy, **options)
        assert chosen.place("cuda") == torch.device("cuda", 1)
        assert chosen.backend == "nccl"
    ps = create_strategy("ps")
    monkeypatch.setenv("LOCAL_RANK", "2")  # a third local rank: the ps ranks share the GPUs
    assert ps.place("cuda") == torch.device("cuda", 0)
    assert ps.backend == "gloo"  # servers on the CPU, payloads staged through host memory


def test_the_device_flag_is_validated():
    assert TrainConfig().device == "auto"
    with pytest.raises(ConfigError, match="--device 'gpu'"):
        TrainConfig(device="gpu")  # type: ignore[arg-type]
    config = dataclasses.replace(TrainConfig(), device="cpu")
    assert config.device == "cpu"


@no_cuda_here
def test_device_cuda_without_cuda_is_refused_before_launch():
    config = TrainConfig.build(strategy="sync", workers=2, device="cuda")
    with pytest.raises(ConfigError, match="--device cpu"):
        validate_config(config)


def test_more_local_processes_than_gpus_are_refused_before_launch(monkeypatch):
    from distlearn.train.launch import check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("auto", "cuda"):
        config = TrainConfig.build(strategy="sync", workers=2, device=device)
        with pytest.raises(ConfigError, match="--workers 1 or fewer, or --device cpu"):
            check_gpus(config, 2)
    check_gpus(TrainConfig.build(strategy="sync", workers=1, device="cuda"), 1)
    check_gpus(TrainConfig.build(strategy="sync", workers=2, device="cpu"), 2)  # the CPU: any number
    check_gpus(TrainConfig.build(strategy="ps", workers=3, device="cuda"), 3)  # ps ranks share the GPU
    check_gpus(TrainConfig.build(strategy="hogwild", workers=2), 2)  # auto: the CPU for hogwild
