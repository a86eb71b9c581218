"""``--strategy dni`` in the trainer: the settings it takes from TrainConfig and the ones it refuses."""

from __future__ import annotations

import pytest

from distlearn.dni import DNIConfig
from distlearn.errors import ConfigError
from distlearn.parallel import create_strategy
from distlearn.parallel.dni import DecoupledStages, dni_config_of
from distlearn.train import TrainConfig, validate_config


def test_train_config_maps_onto_the_pipeline_config() -> None:
    config = TrainConfig.build(
        dataset="mnist", model="mlp", strategy="dni", stages=4, cdni=True, epochs=3, batch_size=64, lr=1e-3,
        seed=5, train_samples=1000, test_samples=100, data_root="/data", out="/tmp/x", comm_timeout=12.0,
    )  # fmt: skip
    strategy = create_strategy("dni", run=config)
    assert isinstance(strategy, DecoupledStages)
    assert not strategy.trains and strategy.role == "stage"
    dni = strategy.dni_config
    assert (dni.stages, dni.cdni, dni.mode, dni.epochs, dni.batch_size, dni.lr) == (
        4,
        True,
        "dni",
        3,
        64,
        1e-3,
    )
    assert (dni.seed, dni.train_samples, dni.test_samples, dni.data_root) == (5, 1000, 100, "/data")
    assert (dni.out, dni.timeout_s) == ("/tmp/x", 12.0)
    assert "cDNI, 4 stages" in strategy.describe()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stages": 0}, "--stages K"),
        ({"optimizer": "sgd"}, "drop --optimizer sgd"),
        ({"model": "resnet20"}, "not resnet20"),
        ({"clip_grad_norm": 1.0}, "--clip-grad-norm"),
        ({"schedule": "cosine"}, "--schedule"),
    ],
)
def test_unsupported_settings_are_refused(changes: dict, message: str) -> None:
    values = {"strategy": "dni", "stages": 3, **changes}
    with pytest.raises(ConfigError, match=message):
        dni_config_of(TrainConfig.build(**values))


def test_batch_norm_reaches_the_pipeline_and_only_for_the_fcn() -> None:
    assert not dni_config_of(TrainConfig.build(strategy="dni", stages=3)).batch_norm  # off by default
    config = TrainConfig.build(strategy="dni", model="mlp", stages=3, dni_batch_norm=True)
    assert dni_config_of(config).batch_norm
    with pytest.raises(ConfigError, match="mlp FCN only.*drop --dni-batch-norm"):
        dni_config_of(TrainConfig.build(strategy="dni", model="lenet", stages=3, dni_batch_norm=True))
    with pytest.raises(ConfigError, match="mlp FCN only.*drop --batch-norm"):
        DNIConfig(model="resnet8", batch_norm=True).validate()


def test_workers_must_match_the_stages() -> None:
    with pytest.raises(ConfigError, match="one process per stage"):
        validate_config(TrainConfig.build(strategy="dni", stages=3, workers=2))


def test_train_from_python_launches_the_stages_and_reads_back_the_result(tmp_path) -> None:
    import distlearn

    config = TrainConfig.build(
        dataset="fashion-mnist", model="mlp", optimizer="adam", lr=1e-3, strategy="dni", stages=2, workers=2,
        steps=12, train_samples=256, test_samples=128, out=str(tmp_path / "run"), quiet=True, progress="off",
        tensorboard="off", eval_every=6,
    )  # fmt: skip
    result = distlearn.train(config)
    assert result.steps == 12 and result.summary["mode"] == "dni" and result.summary["config"]["stages"] == 2
    assert 0.0 <= result.test_accuracy <= 1.0
