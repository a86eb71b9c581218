"""The divergence guard: a non-finite loss, gradient or weight, or an exploding loss, ends the run with a
DivergenceError naming the step and the cause, and the last good checkpoint stays (distlearn.train.guard)."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from distlearn.checkpoint import list_checkpoints, load_checkpoint
from distlearn.errors import ConfigError, DivergenceError
from distlearn.metrics import read_metrics
from distlearn.train import TrainConfig, train
from distlearn.train.guard import MAX_SKIPS_IN_A_ROW
from distlearn.train_cli import command

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig.build(
        model="mlp",
        optimizer="sgd",
        lr=0.05,
        epochs=1,
        batch_size=32,
        checkpoint_every=4,
        log_every=3,
        out=str(tmp_path / "run"),
        progress="off",
        tensorboard="off",
        quiet=True,
    )
    return replace(base, **changes)


def poisoned_model(
    bad_steps: set[int] = frozenset(), *, every_step: bool = False, zero: bool = False
) -> nn.Module:
    """A small MLP whose last bias gets an infinite gradient at the training steps in ``bad_steps`` (from
    1), or at every one: a finite loss with a non-finite gradient. ``zero``: every gradient of those steps
    is zero instead (with plain SGD, a step that changes nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 4))
    step = [0]

    def count(module: nn.Module, args: object) -> None:
        step[0] += module.training  # training forward passes only (evaluation runs in eval mode)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf if every_step or step[0] in bad_steps else grad

    def zeroes(grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if step[0] in bad_steps else grad

    model.register_forward_pre_hook(count)
    if zero:
        for parameter in model.parameters():
            parameter.register_hook(zeroes)
    else:
        model[3].bias.register_hook(poison)
    return model


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_1e6_stops_the_command_with_exit_2_naming_the_step(tmp_path, shared_data, capsys, optimizer):
    status = command([
        "--dataset", "mnist", "--data-root", str(shared_data), "--model", "mlp", "--optimizer", optimizer,
        "--lr", "1e6", "--steps", "60", "--batch-size", "32", "--train-samples", "512",
        "--test-samples", "64", "--log-every", "5", "--threads", "1", "--tensorboard", "off",
        "--progress", "off", "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    error = one_line(capsys.readouterr().err)
    assert status == 2
    assert re.match(r"distlearn train: error: training diverged (at|by) step \d+: ", error), error
    # sgd: the loss turns NaN; adam: it stays finite (about 1e21) but explodes
    assert ("the training loss is nan" in error) if optimizer == "sgd" else ("--max-loss-factor" in error)
    assert f"--lr 1e+06 with --optimizer {optimizer}" in error and "lower --lr" in error
    assert "No checkpoint was written before the divergence" in error
    steps = [int(s) for s in re.findall(r"step (\d+)", error)]
    assert steps and max(steps) <= 5  # found at the first record, not after 60 steps of NaN


def test_divergence_keeps_the_last_good_checkpoint_and_names_it(tmp_path, synthetic):
    train_set, test_set = synthetic
    good = config(tmp_path, steps=8)
    train(good, train_data=train_set, test_data=test_set)
    directory = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in list_checkpoints(directory)}
    newest = list_checkpoints(directory)[-1]
    assert newest.name == "step-00000008.pt"

    # the same run continued at lr 1e6 diverges before its next checkpoint (step 12)
    with pytest.raises(DivergenceError) as caught:
        train(
            replace(good, steps=40, lr=1e6, resume=str(directory)), train_data=train_set, test_data=test_set
        )
    message = str(caught.value)
    assert re.search(r"training diverged at step (9|10|11): the training loss is (nan|inf)", message), message
    assert f"The last good checkpoint is kept: {newest}; continue from it with --resume {newest}" in message
    after = {p.name: p.read_bytes() for p in list_checkpoints(directory)}
    assert after == before  # nothing of the diverged state was written
    assert load_checkpoint(newest)["position"]["step"] == 8

    # and it continues: at the old lr the resumed run ends normally, weights finite
    resumed = train(replace(good, steps=16, resume=str(newest)), train_data=train_set, test_data=test_set)
    assert resumed.steps == 16
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_a_nonfinite_gradient_names_the_parameter_and_the_step(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(tmp_path, log_every=1, checkpoint_every=0)
    with pytest.raises(DivergenceError) as caught:
        train(cfg, model=poisoned_model({5}), train_data=train_set, test_data=test_set)
    message = str(caught.value)
    assert message.startswith("training diverged at step 5: non-finite weights in 3.bias "), message
    assert "(non-finite gradient in 3.bias at step 5)" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_drops_nonfinite_steps_and_counts_them(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(tmp_path, on_nonfinite="skip", checkpoint_every=0)
    result = train(cfg, model=poisoned_model({3, 7}), train_data=train_set, test_data=test_set)
    assert result.steps == 12 and result.summary["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # a dropped step changes nothing: with plain SGD the run equals one whose steps 3 and 7 had zero gradients
    zeroed = poisoned_model({3, 7}, zero=True)
    reference = train(replace(cfg, out=str(tmp_path / "ref"), on_nonfinite="stop"), model=zeroed,
                      train_data=train_set, test_data=test_set)  # fmt: skip
    assert reference.summary["skipped_steps"] == 0
    for got, expected in zip(result.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(got, expected)
    untouched = train(replace(cfg, out=str(tmp_path / "plain")), model=poisoned_model(), train_data=train_set,
                      test_data=test_set)  # fmt: skip
    pairs = zip(result.model.parameters(), untouched.model.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_skip_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(tmp_path, on_nonfinite="skip", epochs=3, checkpoint_every=0)
    with pytest.raises(DivergenceError) as caught:
        train(cfg, model=poisoned_model(every_step=True), train_data=train_set, test_data=test_set)
    message = str(caught.value)
    assert f"the last {MAX_SKIPS_IN_A_ROW} steps up to step {MAX_SKIPS_IN_A_ROW}" in message
    assert "non-finite gradient in 3.bias" in message


def test_skip_is_refused_for_an_optimizer_that_steps_with_a_closure(tmp_path, synthetic):
    with pytest.raises(ConfigError, match="--on-nonfinite skip cannot drop a step of --optimizer cg-fr"):
        train(config(tmp_path, optimizer="cg-fr", on_nonfinite="skip"), train_data=synthetic[0],
              test_data=synthetic[1])  # fmt: skip


def test_max_loss_factor_is_validated_and_0_turns_the_check_off(tmp_path, synthetic):
    with pytest.raises(ConfigError, match="--max-loss-factor must be above 1"):
        config(tmp_path, max_loss_factor=0.5).validate()
    train_set, test_set = synthetic
    # a deliberately exploding but finite run: Adam at lr 1e3
    exploding = config(tmp_path, optimizer="adam", lr=1e3, steps=6, checkpoint_every=0, log_every=6)
    with pytest.raises(DivergenceError, match="times the first step's"):
        train(exploding, train_data=train_set, test_data=test_set)
    result = train(replace(exploding, out=str(tmp_path / "off"), max_loss_factor=0.0), train_data=train_set,
                   test_data=test_set)  # fmt: skip
    assert result.steps == 6


@pytest.fixture
def torchrun_job(tmp_path, shared_data, capfd, monkeypatch):
    """``torchrun_job(*flags)``: ``distlearn train --strategy sync --workers 2`` at lr 1e6, the command run
    in this process (its torchrun job as the command starts it: a session of its own, stopped on any error
    here); (exit status, the output of it and its processes, seconds)."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src") + (os.pathsep + path if path else ""))  # the workers'

    def run(*flags: str) -> tuple[int, str, float]:
        argv = [
            "--strategy", "sync", "--workers", "2", "--dataset", "mnist", "--data-root", str(shared_data),
            "--model", "mlp", "--optimizer", "sgd", "--lr", "1e6", "--steps", "200", "--batch-size", "32",
            "--train-samples", "512", "--test-samples", "64", "--log-every", "10", "--threads", "1",
            "--tensorboard", "off", "--progress", "off", "--out", str(tmp_path / "run"), *flags,
        ]  # fmt: skip
        capfd.readouterr()
        started = time.monotonic()
        status = command(argv)
        seconds = time.monotonic() - started
        captured = capfd.readouterr()
        return status, captured.out + captured.err, seconds

    return run


@pytest.mark.timeout(240)
def test_sync_two_ranks_at_lr_1e6_both_stop(torchrun_job):
    status, output, seconds = torchrun_job()
    assert status != 0, output[-3000:]
    for rank in (0, 1):  # every rank stops by itself at the same step: no rank waits in an allreduce
        assert re.search(rf"rank {rank}: training diverged at step \d+: the training loss is nan", output), (
            output[-3000:]
        )
    assert seconds < 200


@pytest.mark.timeout(240)
def test_check_every_reports_nan_weights_as_divergence_not_a_bug(torchrun_job):
    status, output, _ = torchrun_job("--check-every", "1")
    assert status != 0, output[-3000:]
    assert "found by --check-every" in output and "training diverged by step" in output, output[-3000:]
    assert "replicas diverged" not in output and "file a bug" not in output


def test_a_resumed_run_takes_a_new_lr_and_keeps_the_schedules_position(tmp_path, synthetic):
    train_set, test_set = synthetic
    cosine = config(tmp_path / "a", lr=0.1, schedule="cosine", warmup_steps=2, steps=12, log_every=1)
    train(cosine, train_data=train_set, test_data=test_set)
    eighth = tmp_path / "a" / "run" / "checkpoints" / "step-00000008.pt"
    resumed = replace(cosine, lr=0.025, resume=str(eighth))
    train(resumed, train_data=train_set, test_data=test_set)
    straight = train(replace(cosine, out=str(tmp_path / "b"), lr=0.025), train_data=train_set,
                     test_data=test_set)  # fmt: skip
    got = {r.step: r.lr for r in read_metrics(tmp_path / "a" / "run") if r.kind == "train"}
    expected = {r.step: r.lr for r in read_metrics(straight.metrics_path) if r.kind == "train"}
    assert got[4] == pytest.approx(4 * expected[4])  # before the resume: the first run's lr
    for step in range(9, 13):
        assert got[step] == pytest.approx(expected[step]), step


def test_the_replica_check_passes_finite_weights_and_calls_nan_weights_divergence(tmp_path):
    import torch.distributed as dist

    from distlearn.parallel.sync import SyncDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        strategy = SyncDataParallel(check_every=1, run=config(tmp_path))
        model = nn.Linear(3, 2)
        strategy.check_replicas(model, 5)  # equal and finite: nothing to say
        with torch.no_grad():
            model.weight[0, 0] = math.nan
        with pytest.raises(DivergenceError) as caught:
            strategy.check_replicas(model, 6)
    finally:
        dist.destroy_process_group()
    message = str(caught.value)
    assert message.startswith("rank 0: training diverged by step 6: this rank's weights are not finite")
    assert "lower --lr" in message and "No checkpoint was written before the divergence" in message
