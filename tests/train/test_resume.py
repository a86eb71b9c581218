"""Checkpoint and resume: an interrupted run, resumed, ends bit-identical to one that never stopped."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distlearn.checkpoint import list_checkpoints, load_checkpoint
from distlearn.errors import CheckpointError, ConfigError
from distlearn.metrics import read_metrics
from distlearn.parallel import SingleProcess
from distlearn.train import TrainConfig, train


class Crash(RuntimeError):
    pass


class CrashAfter(SingleProcess):
    """The single-process strategy, except that the process 'dies' right after optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def after_step(self, model, optimizer, step):
        if step + 1 == self.at:
            raise Crash(f"simulated crash after step {self.at}")


def config(tmp_path, **changes) -> TrainConfig:
    # Everything that carries state across steps is switched on: Adam's moments, a warm-up + cosine
    # schedule, dropout (LeNet), augmentation (crop + flip generator) and clipping.
    base = TrainConfig.build(
        model="lenet",
        optimizer="torch-adam",
        lr=3e-3,
        epochs=3,
        batch_size=32,
        schedule="cosine",
        warmup_steps=5,
        clip_grad_norm=1.0,
        augment=True,
        checkpoint_every=5,
        keep_checkpoints=2,
        out=str(tmp_path / "run"),
        log_every=3,
        progress="off",
        tensorboard="off",
        quiet=True,
    )
    return replace(base, **changes)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "crash_at,checkpoint_every,resumed_from",
    [
        (8, 5, 5),  # mid-epoch (12 steps per epoch)
        (14, 6, 12),  # at the end of epoch 1, after its evaluation
        (27, 5, 25),  # mid-epoch 3, after a change of epoch
    ],
)
def test_resume_gives_bit_identical_weights(tmp_path, synthetic, crash_at, checkpoint_every, resumed_from):
    train_set, test_set = synthetic
    reference = train(config(tmp_path / "full", checkpoint_every=checkpoint_every), train_data=train_set,
                      test_data=test_set)  # fmt: skip

    interrupted = config(tmp_path / "crash", checkpoint_every=checkpoint_every)
    with pytest.raises(Crash):
        train(interrupted, strategy=CrashAfter(crash_at), train_data=train_set, test_data=test_set)
    newest = list_checkpoints(tmp_path / "crash" / "run" / "checkpoints")[-1]
    assert load_checkpoint(newest)["position"]["step"] == resumed_from

    resumed = train(
        replace(interrupted, resume=str(tmp_path / "crash" / "run" / "checkpoints")),
        train_data=train_set,
        test_data=test_set,
    )
    assert resumed.steps == reference.steps == 36
    expected, got = state(reference.model), state(resumed.model)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.test_accuracy == reference.test_accuracy
    # the resumed run appended to the metrics file: one eval per epoch over both processes, one summary
    records = read_metrics(tmp_path / "crash" / "run")
    assert [r.step for r in records if r.kind == "eval"] == [12, 24, 36]
    assert [r.kind for r in records].count("summary") == 1


def test_checkpoint_holds_everything_needed(tmp_path, synthetic):
    result = train(config(tmp_path, epochs=1), train_data=synthetic[0], test_data=synthetic[1])
    saved = load_checkpoint(result.checkpoint)
    assert {"model", "optimizer", "scheduler", "strategy", "position", "rng", "config"} <= saved.keys()
    on_cuda = {"cuda"} if torch.cuda.is_available() else set()  # --device auto: the GPU's generator too
    assert set(saved["rng"]) == {"torch", "numpy", "python", "augment"} | on_cuda
    assert saved["position"]["step"] == 12 and saved["position"]["epoch_complete"]
    for key, value in result.model.state_dict().items():
        assert torch.equal(saved["model"][key], value)
    # atomic writes leave no temporary files; only the newest two are kept
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["step-00000010.pt", "step-00000012.pt"]


def test_truncated_checkpoint_is_a_clear_error_and_the_previous_one_survives(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(tmp_path, epochs=1)
    reference = train(cfg, train_data=train_set, test_data=test_set)
    directory = tmp_path / "run" / "checkpoints"
    newest, previous = directory / "step-00000012.pt", directory / "step-00000010.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError) as caught:
        train(replace(cfg, epochs=2, resume=str(directory)), train_data=train_set, test_data=test_set)
    message = str(caught.value)
    assert str(newest) in message and "truncated or corrupt" in message
    assert f"--resume {previous}" in message

    # the previous checkpoint is intact and resumes to the same weights as the first run
    assert load_checkpoint(previous)["position"]["step"] == 10
    again = train(replace(cfg, resume=str(previous)), train_data=train_set, test_data=test_set)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value)


def test_resume_with_other_settings_names_the_flag(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(tmp_path, epochs=1)
    train(cfg, train_data=train_set, test_data=test_set)
    with pytest.raises(ConfigError, match="--batch-size 32"):
        train(replace(cfg, batch_size=64, resume=str(tmp_path / "run" / "checkpoints")), train_data=train_set,
              test_data=test_set)  # fmt: skip


def test_resume_can_extend_a_finished_run(tmp_path, synthetic):
    train_set, test_set = synthetic
    one = config(tmp_path / "a", epochs=1, schedule="constant", warmup_steps=0)
    train(one, train_data=train_set, test_data=test_set)
    extended = train(replace(one, epochs=2, resume=str(tmp_path / "a" / "run" / "checkpoints")),
                     train_data=train_set, test_data=test_set)  # fmt: skip
    straight = train(config(tmp_path / "b", epochs=2, schedule="constant", warmup_steps=0),
                     train_data=train_set, test_data=test_set)  # fmt: skip
    assert extended.steps == 24
    for key, value in straight.model.state_dict().items():
        assert torch.equal(extended.model.state_dict()[key], value)


def test_resumed_run_reports_only_its_own_steps_and_time(tmp_path, synthetic):
    train_set, test_set = synthetic
    interrupted = config(tmp_path, epochs=1)  # 12 steps of 32 examples; checkpoint every 5 steps
    with pytest.raises(Crash):
        train(interrupted, strategy=CrashAfter(8), train_data=train_set, test_data=test_set)
    resumed = train(
        replace(interrupted, resume=str(tmp_path / "run" / "checkpoints")), train_data=train_set,
        test_data=test_set,
    )  # fmt: skip
    assert resumed.summary["resumed_from_step"] == 5 and resumed.summary["steps_this_run"] == 7
    # samples/s is this process's 7 steps x 32 examples over this process's training seconds
    assert resumed.samples_per_s * resumed.train_seconds == pytest.approx(7 * 32)
    summary = read_metrics(tmp_path / "run")[-1]
    assert summary.kind == "summary" and summary.samples_per_s == pytest.approx(resumed.samples_per_s)
    fresh = train(config(tmp_path / "fresh", epochs=1), train_data=train_set, test_data=test_set)
    assert fresh.summary["resumed_from_step"] is None and fresh.summary["steps_this_run"] == 12
    assert fresh.samples_per_s * fresh.train_seconds == pytest.approx(12 * 32)
