"""``--device``: the trainer on the CPU exactly as before, checkpoints of CPU tensors, and (where CUDA is)
the same run on a GPU: model, batches, optimizer state and evaluation on the device, a checkpoint that
loads without one, and a resume that continues the run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_resume import Crash, CrashAfter  # the crash-after-step strategy of the resume tests
from torch import nn

from distlearn.checkpoint import list_checkpoints, load_checkpoint
from distlearn.devices import place_model
from distlearn.errors import ConfigError
from distlearn.train import TrainConfig, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def walk_tensors(value):
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from walk_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from walk_tensors(item)


def config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig.build(
        model="lenet", optimizer="torch-adam", lr=3e-3, epochs=2, batch_size=32, augment=True,
        checkpoint_every=5, out=str(tmp_path / "run"), log_every=4, progress="off", tensorboard="off",
        quiet=True,
    )  # fmt: skip
    return replace(base, **changes)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is the CPU only on a machine without CUDA")
def test_device_cpu_is_the_run_of_before(tmp_path, synthetic):
    """``--device cpu`` places nothing: the run is bitwise the default (auto) run of a CPU machine."""
    train_set, test_set = synthetic
    auto = train(config(tmp_path / "auto"), train_data=train_set, test_data=test_set)
    cpu = train(config(tmp_path / "cpu", device="cpu"), train_data=train_set, test_data=test_set)
    expected, got = weights(auto.model), weights(cpu.model)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert cpu.test_accuracy == auto.test_accuracy and cpu.test_loss == auto.test_loss
    assert cpu.summary["device"] == auto.summary["device"] == "cpu"


def test_device_cpu_checkpoint_resumes_bitwise_and_holds_cpu_tensors(tmp_path, synthetic):
    train_set, test_set = synthetic
    reference = train(config(tmp_path / "full", device="cpu"), train_data=train_set, test_data=test_set)
    assert all(p.device.type == "cpu" for p in reference.model.parameters())
    interrupted = config(tmp_path / "crash", device="cpu")
    with pytest.raises(Crash):
        train(interrupted, strategy=CrashAfter(8), train_data=train_set, test_data=test_set)
    directory = tmp_path / "crash" / "run" / "checkpoints"
    saved = load_checkpoint(list_checkpoints(directory)[-1])
    assert saved["position"]["step"] == 5
    assert "cuda" not in saved["rng"]  # no CUDA generator on a CPU run
    assert all(t.device.type == "cpu" for t in walk_tensors(saved))
    resumed = train(replace(interrupted, resume=str(directory)), train_data=train_set, test_data=test_set)
    expected, got = weights(reference.model), weights(resumed.model)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_model_whose_optimizer_exists_is_not_moved():
    """The trainer moves a model it builds the optimizer for; a model whose optimizer exists must be there."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="move it before building its optimizer"):
        place_model(model, torch.device("cuda", 0), optimizer)  # refused before anything moves
    assert place_model(model, torch.device("cpu"), optimizer) is model


@pytest.mark.gpu
@needs_cuda
def test_cuda_run_places_everything_on_the_gpu_and_checkpoints_load_anywhere(tmp_path, synthetic):
    train_set, test_set = synthetic
    interrupted = config(tmp_path / "crash", device="cuda")
    with pytest.raises(Crash):
        train(interrupted, strategy=CrashAfter(8), train_data=train_set, test_data=test_set)
    directory = tmp_path / "crash" / "run" / "checkpoints"
    newest = list_checkpoints(directory)[-1]
    saved = torch.load(newest, weights_only=True)  # no map_location: every tensor was saved on the CPU
    assert all(t.device.type == "cpu" for t in walk_tensors(saved))
    assert saved["rng"]["cuda"].dtype == torch.uint8
    resumed = train(replace(interrupted, resume=str(directory)), train_data=train_set, test_data=test_set)
    assert all(p.device.type == "cuda" for p in resumed.model.parameters())
    reference = train(config(tmp_path / "full", device="cuda"), train_data=train_set, test_data=test_set)
    # CUDA kernels torch marks nondeterministic (warn_only) may reorder sums: close, not bitwise
    expected, got = weights(reference.model), weights(resumed.model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_cuda_run_follows_the_cpu_run(tmp_path, synthetic):
    """An MLP with SGD (no convolution: no TF32) on the GPU takes the CPU run's steps up to rounding."""
    train_set, test_set = synthetic
    common = {"model": "mlp", "optimizer": "sgd", "lr": 0.05, "epochs": 1, "augment": False}
    cpu = train(config(tmp_path / "cpu", device="cpu", **common), train_data=train_set, test_data=test_set)
    cuda = train(config(tmp_path / "cuda", device="cuda", **common), train_data=train_set, test_data=test_set)
    assert cuda.summary["device"].startswith("cuda")
    expected, got = weights(cpu.model), weights(cuda.model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert abs(cuda.test_loss - cpu.test_loss) < 1e-3
