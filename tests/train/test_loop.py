"""The trainer loop: seeds give identical weights, a step is the hand-written step, clipping, schedules."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from distlearn.errors import ConfigError
from distlearn.models import create_model
from distlearn.models.transforms import BatchTransform
from distlearn.parallel import SingleProcess, epoch_batches
from distlearn.train import TrainConfig, create_optimizer, parse_options, train


def config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig.build(
        dataset="fashion-mnist",
        model="lenet",
        optimizer="torch-adam",
        lr=3e-3,
        epochs=2,
        batch_size=32,
        augment=True,
        out=str(tmp_path / "run"),
        log_every=4,
        progress="off",
        tensorboard="off",
        quiet=True,
    )
    return replace(base, **changes)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, synthetic):
    train_set, test_set = synthetic
    first = train(config(tmp_path / "a"), train_data=train_set, test_data=test_set)
    second = train(config(tmp_path / "b"), train_data=train_set, test_data=test_set)
    third = train(config(tmp_path / "c", seed=1), train_data=train_set, test_data=test_set)
    assert_identical(weights(first.model), weights(second.model))
    assert first.test_accuracy == second.test_accuracy
    assert any(
        not torch.equal(weights(first.model)[k], weights(third.model)[k]) for k in weights(first.model)
    )


def test_the_loop_learns_the_synthetic_task(tmp_path, synthetic):
    train_set, test_set = synthetic
    result = train(config(tmp_path, epochs=3), train_data=train_set, test_data=test_set)
    assert result.test_accuracy >= 0.9  # 4 classes: chance is 0.25
    assert result.steps == 3 * (384 // 32)
    assert len(result.evaluations) == 3  # one per epoch
    assert result.evaluations[-1].accuracy == result.test_accuracy


def first_batch(train_set, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    indices = next(epoch_batches(len(train_set.labels), global_batch=cfg.batch_size, seed=cfg.seed, epoch=0))
    x = BatchTransform(train_set.mean, train_set.std)(train_set.images[indices])
    return x, train_set.labels[indices]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_one_step_equals_the_hand_written_sgd_step(tmp_path, synthetic, clip):
    """w1 = w0 - lr * g * min(1, c / ||g||), with g the mean cross-entropy gradient on the first batch."""
    train_set, test_set = synthetic
    cfg = config(
        tmp_path, model="mlp", optimizer="torch-sgd", lr=0.5, steps=1, augment=False, clip_grad_norm=clip
    )
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=4, image_size=12)
    start = copy.deepcopy(model)
    train(cfg, model=model, train_data=train_set, test_data=test_set)

    x, y = first_batch(train_set, cfg)
    loss = nn.functional.cross_entropy(start(x), y)
    grads = torch.autograd.grad(loss, list(start.parameters()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = 1.0 if clip is None else min(1.0, clip / (norm.item() + 1e-6))
    if clip is not None:
        assert norm.item() > clip  # the clip is active in this test
    for before, after, g in zip(start.parameters(), model.parameters(), grads, strict=True):
        torch.testing.assert_close(after.detach(), before.detach() - 0.5 * scale * g, rtol=1e-5, atol=1e-6)


class RecordingStrategy(SingleProcess):
    """The single-process strategy that notes the learning rate each optimizer step is about to use."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def before_step(self, model, optimizer, step):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_warmup_then_cosine_lrs_seen_by_the_optimizer(tmp_path, synthetic):
    import math

    train_set, test_set = synthetic
    cfg = config(
        tmp_path, model="mlp", optimizer="torch-sgd", lr=0.2, epochs=2, schedule="cosine", warmup_steps=4
    )
    strategy = RecordingStrategy()
    train(cfg, strategy=strategy, train_data=train_set, test_data=test_set)
    total = 2 * (384 // 32)
    expected = [0.2 * (t + 1) / 4 for t in range(4)]
    expected += [0.2 * 0.5 * (1 + math.cos(math.pi * (t - 4) / (total - 4))) for t in range(4, total)]
    assert strategy.lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_then_step_decay_lrs_seen_by_the_optimizer(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(
        tmp_path, model="mlp", optimizer="torch-sgd", lr=0.1, epochs=1, schedule="step", warmup_steps=2,
        lr_decay_every=3, lr_decay_factor=0.5,
    )  # fmt: skip
    strategy = RecordingStrategy()
    train(cfg, strategy=strategy, train_data=train_set, test_data=test_set)
    # steps 0-1 warm up; then 3 steps at 0.1, 3 at 0.05, 3 at 0.025, 1 at 0.0125 (12 steps in all)
    expected = [0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125]
    assert strategy.lrs == pytest.approx(expected, rel=1e-12)


def test_user_optimizer_object(tmp_path, synthetic):
    train_set, test_set = synthetic
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=4, image_size=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    result = train(
        config(tmp_path), model=model, optimizer=optimizer, train_data=train_set, test_data=test_set
    )
    assert result.model is model and result.summary["optimizer"] == "SGD"
    assert result.test_accuracy >= 0.9


def test_closure_optimizer_step_equals_torch_lbfgs_on_the_same_batch(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(
        tmp_path,
        model="mlp",
        optimizer="torch-lbfgs",
        lr=0.5,
        steps=1,
        augment=False,
        optimizer_option=("max_iter=4",),
    )
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=4, image_size=12)
    reference = copy.deepcopy(model)
    train(cfg, model=model, optimizer=torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4),
          train_data=train_set, test_data=test_set)  # fmt: skip

    x, y = first_batch(train_set, cfg)
    lbfgs = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=4)
    evaluations = []

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = nn.functional.cross_entropy(reference(x), y)
        loss.backward()
        evaluations.append(loss.item())
        return loss

    lbfgs.step(closure)
    assert len(evaluations) > 1  # several evaluations in one step: the closure path is exercised
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_optimizer_without_its_model_is_rejected(tmp_path, synthetic):
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="model="):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train(config(tmp_path), optimizer=optimizer, train_data=synthetic[0], test_data=synthetic[1])
    other = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="model.parameters"):
        train(config(tmp_path), model=model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
              train_data=synthetic[0], test_data=synthetic[1])  # fmt: skip


def test_create_optimizer_naming_rule():
    params = [nn.Parameter(torch.zeros(3))]
    assert type(create_optimizer("torch-sgd", params, lr=0.1)) is torch.optim.SGD
    assert type(create_optimizer("torch-adamw", params)) is torch.optim.AdamW
    assert type(create_optimizer("torch-rmsprop", params, lr=0.01, alpha=0.9)) is torch.optim.RMSprop
    with pytest.raises(ConfigError, match="torch-adam"):
        create_optimizer("torch-nonesuch", params)
    with pytest.raises(ConfigError, match="option"):
        create_optimizer("torch-sgd", params, lr=0.1, not_a_hyperparameter=1)


def test_parse_options():
    assert parse_options(("momentum=0.9", "betas=0.9,0.99", "nesterov=true", "weight-decay=5e-4")) == {
        "momentum": 0.9,
        "betas": (0.9, 0.99),
        "nesterov": True,
        "weight_decay": 5e-4,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(("momentum",))
    with pytest.raises(ConfigError, match="not a number"):
        parse_options(("momentum=fast",))


@pytest.mark.parametrize(
    "name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "cg-hs"]
)
def test_every_distlearn_optimizer_trains_through_the_loop(tmp_path, synthetic, name):
    """distlearn.optim's names work in the trainer; CG with its closure-driven line search."""
    train_set, test_set = synthetic
    lr = {"sgd": 0.05, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.05, "adadelta": 1.0}.get(name, 3e-3)
    result = train(
        config(tmp_path, optimizer=name, lr=lr, model="mlp", epochs=1, augment=False),
        train_data=train_set,
        test_data=test_set,
    )
    assert result.steps == len(train_set.labels) // 32
    assert result.test_accuracy > 0.5  # 4 classes: chance is 0.25


def test_adam_counting_epochs_sees_the_trainer_advance_p(tmp_path, synthetic):
    train_set, test_set = synthetic
    cfg = config(tmp_path, optimizer="adam", optimizer_option=("count='epoch'",), epochs=2, checkpoints=False)
    seen = []
    original = create_optimizer

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    import distlearn.optim as optim_registry

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim_registry, "create", recording)  # the trainer builds its optimizer through it
        train(cfg, train_data=train_set, test_data=test_set)
    (optimizer,) = seen
    assert optimizer.param_groups[0]["count"] == "epoch"
    assert optimizer.param_groups[0]["epoch"] == 3  # p = 1 in epoch 1, 2 in epoch 2, then advanced once more


class _WaitingStrategy(SingleProcess):
    """One process whose step hook blocks 20 ms, as a strategy waiting for its allreduce would."""

    def before_step(self, model, optimizer, step):
        import time

        time.sleep(0.02)


def test_train_records_split_each_window_into_communication_and_compute(tmp_path, synthetic):
    from distlearn.metrics import read_metrics

    train_set, test_set = synthetic
    runs = {}
    for name, strategy in (("waiting", _WaitingStrategy()), ("plain", SingleProcess())):
        cfg = config(tmp_path / name, epochs=1, augment=False, log_every=4)
        train(cfg, strategy=strategy, train_data=train_set, test_data=test_set)
        runs[name] = [r for r in read_metrics(tmp_path / name / "run" / "metrics.jsonl") if r.kind == "train"]
    assert len(runs["waiting"]) == len(runs["plain"]) == (384 // 32) // 4
    for record in runs["waiting"]:
        assert 4 * 0.02 <= record.extra["comm_s"] < 4 * 0.02 + 0.5  # four steps of 20 ms blocked
        assert record.extra["compute_s"] >= 0
    for record in runs["plain"]:
        assert record.extra["comm_s"] < 0.02 and record.extra["compute_s"] > 0
