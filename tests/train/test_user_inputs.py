"""The trainer with a user's model, loss and data: from Python objects and by import path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from distlearn.errors import ConfigError
from distlearn.parallel.base import epoch_batches
from distlearn.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = "examples.train_sequence_regression"


def _config(tmp_path, **values):
    base = dict(optimizer="torch-sgd", lr=0.05, batch_size=16, steps=12, out=str(tmp_path / "run"),
                quiet=True, progress="off", tensorboard="off", checkpoints=False)  # fmt: skip
    base.update(values)
    return TrainConfig(**base)


def _regression(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator)
    return x, x @ torch.randn(5, 2, generator=generator) + 0.1


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def test_float_regression_matches_a_hand_written_sgd_loop(tmp_path):
    # the trainer's weights equal torch.optim.SGD on MSE over the same seeded batch order
    x, y = _regression()
    config = _config(tmp_path, epochs=3, steps=None)
    result = train(
        config, model=_model(), loss_fn=nn.functional.mse_loss, train_data=(x, y), test_data=(x, y)
    )
    reference = _model()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    for epoch in range(3):
        for indices in epoch_batches(len(y), global_batch=16, seed=0, epoch=epoch):
            sgd.zero_grad()
            nn.functional.mse_loss(reference(x[indices]), y[indices]).backward()
            sgd.step()
    for mine, theirs in zip(result.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    with torch.no_grad():
        expected = nn.functional.mse_loss(reference(x), y).item()
    assert result.test_loss == pytest.approx(expected, rel=1e-6)
    assert result.test_accuracy is None and result.summary["test_accuracy"] is None
    assert result.summary["classification"] is False
    assert all(r.accuracy is None for r in result.evaluations)


def test_a_torch_dataset_trains_as_its_tensors_do(tmp_path):
    x, y = _regression()
    common = dict(model=None, loss_fn=nn.functional.mse_loss)
    a = train(_config(tmp_path / "a"), **{**common, "model": _model()}, train_data=(x, y), test_data=(x, y))
    b = train(_config(tmp_path / "b"), **{**common, "model": _model()},
              train_data=TensorDataset(x, y), test_data=TensorDataset(x, y))  # fmt: skip
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_integer_labels_report_accuracy_with_cross_entropy(tmp_path):
    x, _ = _regression()
    labels = (x[:, 0] > 0).long()
    result = train(_config(tmp_path), model=_model(), train_data=(x, labels), test_data=(x, labels))
    with torch.no_grad():
        expected = (result.model(x).argmax(1) == labels).float().mean().item()
    assert result.test_accuracy == pytest.approx(expected)


@pytest.fixture
def on_repo_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))


def test_import_paths_build_the_model_data_and_loss(tmp_path, on_repo_path):
    config = _config(tmp_path, model=f"{EXAMPLE}:make_model", dataset=f"{EXAMPLE}:make_data",
                     loss="torch.nn.functional:mse_loss", optimizer="adam", lr=0.01, steps=4)  # fmt: skip
    result = train(config)
    assert type(result.model).__name__ == "SineGRU"
    assert result.summary["dataset"] == f"{EXAMPLE}:make_data" and result.test_accuracy is None


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(model="no_such_package.nets:make"), "does not import"),
        (dict(model="builtins:dict"), "not a torch.nn.Module"),
        (dict(model="torch.nn:NoSuchThing"), "has no 'NoSuchThing'"),
        (dict(model=f"{EXAMPLE}:make_model", dataset="builtins:list"), "return (train, test)"),
        (dict(model="resnet99"), "resnet20"),
        (dict(dataset="imagenet"), "cifar10"),
        (dict(loss="hinge"), "package.module:name"),
    ],
)
def test_bad_parts_are_config_errors_naming_the_fix(tmp_path, on_repo_path, values, message):
    with pytest.raises(ConfigError, match=None) as error:
        train(_config(tmp_path, **values))
    assert message in str(error.value)


def test_data_that_does_not_fit_the_model_is_refused_before_training(tmp_path):
    x, y = _regression()
    with pytest.raises(ConfigError, match="does not fit the model"):
        train(_config(tmp_path), model=nn.Linear(3, 2), loss_fn=nn.functional.mse_loss,
              train_data=(x, y), test_data=(x, y))  # fmt: skip
    with pytest.raises(ConfigError, match="not class labels"):
        train(_config(tmp_path), model=_model(), train_data=(x, y), test_data=(x, y))
    with pytest.raises(ConfigError, match="takes images"):
        train(
            _config(tmp_path, model="mlp"),
            loss_fn=nn.functional.mse_loss,
            train_data=(x, y),
            test_data=(x, y),
        )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_objects_with_several_workers_point_to_the_import_path_form(tmp_path):
    x, y = _regression()
    config = _config(tmp_path, strategy="sync", workers=2)
    with pytest.raises(ConfigError, match="import path"):
        train(config, model=_model(), loss_fn=nn.functional.mse_loss, train_data=(x, y), test_data=(x, y))
