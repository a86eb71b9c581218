"""The "adding a strategy" example (example_strategy.py, shown in docs/architecture.md) through every door.

``distlearn train`` (and its launch file, a config file with the strategy's table), and
``distlearn.parallelize()``, with nothing registered but the import path; its result equals
``--strategy sync`` bitwise, and its option acts as its formula says.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distlearn
from distlearn.checkpoint import load_checkpoint
from distlearn.cli import main
from distlearn.launch import free_port
from distlearn.parallel import STRATEGIES, create_strategy, register_strategy
from distlearn.train_cli import parse_config

HERE = Path(__file__).resolve().parent
TARGET = "example_strategy:TensorAllreduce"
FLAGS = [
    "--dataset", "fashion-mnist", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.05", "--steps", "6",
    "--batch-size", "64", "--train-samples", "512", "--test-samples", "128", "--log-every", "3",
    "--progress", "off", "--tensorboard", "off", "--quiet", "--threads", "1", "--workers", "2",
]  # fmt: skip


@pytest.fixture
def train_cli(capfd, monkeypatch):
    """``train_cli(out, *flags)``: ``distlearn train FLAGS`` run in this process (its torchrun job starts from
    here as from the command), this directory importable here and in the workers; the newest weights."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    def run(out: Path, *flags: str) -> dict[str, torch.Tensor]:
        capfd.readouterr()
        code = main(["train", *FLAGS, *flags, "--out", str(out)])
        assert code == 0, capfd.readouterr().err[-2000:]
        newest = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
        return load_checkpoint(newest)["model"]

    return run


@pytest.mark.timeout(300)
def test_the_example_trains_through_distlearn_train_and_equals_sync_bitwise(tmp_path, train_cli):
    ours = train_cli(tmp_path / "example", "--strategy", TARGET, "--scale", "1.0")
    reference = train_cli(tmp_path / "sync", "--strategy", "sync")
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name
    launch = (tmp_path / "example" / "launch.toml").read_text()
    assert "[tensor-allreduce]" in launch and "scale = 1.0" in launch


def test_a_config_file_holds_the_example_options_in_its_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    path = tmp_path / "run.toml"
    path.write_text(f'strategy = "{TARGET}"\nepochs = 3\n[tensor-allreduce]\nscale = 0.25\n')
    config = parse_config(["--config", str(path), "--epochs", "4"])
    assert (config.epochs, config.options.scale) == (4, 0.25)  # the flag wins over the file
    assert parse_config(["--config", str(path), "--scale", "0.5"]).options.scale == 0.5


def test_one_registration_line_makes_it_a_named_strategy(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setitem(STRATEGIES, "tensor-allreduce", "")  # restored after the test
    register_strategy("tensor-allreduce", TARGET)
    built = create_strategy("tensor-allreduce", scale=2.0)
    assert type(built).__name__ == "TensorAllreduce" and built.options.scale == 2.0
    with pytest.raises(distlearn.errors.ConfigError, match="--scale must be > 0"):
        create_strategy("tensor-allreduce", scale=0.0)


def test_parallelize_runs_the_example_and_its_option_scales_the_step(monkeypatch):
    """One process (R = 1): the averaged gradient is g itself, so SGD at lr 1 moves w by -scale * g."""
    monkeypatch.syspath_prepend(str(HERE))
    port = free_port()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        model = torch.nn.Linear(3, 2)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer = distlearn.parallelize(
            model, optimizer, strategy=TARGET, scale=0.5, comm_timeout=30
        )
        x = torch.arange(6.0).reshape(2, 3)
        model(x).pow(2).sum().backward()
        gradients = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for before, after, g in zip(start, model.parameters(), gradients, strict=True):
            # the strategy's pre-step hook scaled the raw gradient g in place: the step used 0.5 * g
            assert torch.equal(after.detach(), before - 0.5 * g)
            assert g.abs().sum() > 0
        assert optimizer.distlearn_strategy.stats()["bytes_sent"] == sum(4 * p.numel() for p in start)
    finally:
        dist.destroy_process_group()
