"""``distlearn train``: train a model on a dataset with one strategy; metrics, checkpoints, a summary.

Run manual::

    distlearn train --dataset fashion-mnist --model lenet --optimizer adam --epochs 2
    distlearn train --dataset cifar10 --model resnet8 --optimizer torch-sgd --lr 0.1 \\
        --optimizer-option momentum=0.9 weight_decay=5e-4 --schedule cosine --warmup-steps 200
    distlearn train --config run.toml --epochs 5        # file values; flags given on the line win
    distlearn train ... --resume runs/train/checkpoints  # continue from the newest checkpoint there
    distlearn plot runs/train runs/other --out curves.png

Every flag is a field of :class:`distlearn.train.TrainConfig`; a ``--config`` file (TOML, or YAML when
PyYAML is installed) holds the same names as keys (``batch_size`` or ``batch-size``). Writes
``OUT/metrics.jsonl`` (schema in :mod:`distlearn.metrics`) and ``OUT/checkpoints/step-*.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from distlearn.config import add_arguments as add_config_arguments
from distlearn.config import from_args, from_dict, load_toml, to_toml
from distlearn.errors import ConfigError
from distlearn.launch import in_torchrun, launch_local
from distlearn.train import TrainConfig, train, validate_config

__all__ = ["add_arguments", "config_from_args", "launch_workers", "load_config_file", "run"]

_EXPLICIT = "_explicit_flags"
_recording_classes: dict[type, type] = {}


def _recording(action_class: type[argparse.Action]) -> type[argparse.Action]:
    """A subclass of ``action_class`` that notes in the namespace that its flag was given on the line."""
    if action_class not in _recording_classes:

        class Recording(action_class):  # type: ignore[valid-type, misc]
            def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
                super().__call__(parser, namespace, values, option_string)
                namespace.__dict__.setdefault(_EXPLICIT, set()).add(self.dest)

        _recording_classes[action_class] = Recording
    return _recording_classes[action_class]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distlearn train`` options: ``--config FILE`` plus one per :class:`TrainConfig` field."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML (or YAML) file with TrainConfig fields as keys; flags given on the command line win",
    )
    add_config_arguments(parser, TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:  # argparse keeps no record of which flags were given; note it ourselves
        if action.dest in names:
            action.__class__ = _recording(type(action))


def load_config_file(path: str | Path) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file, or YAML (``.yaml``, ``.yml``) when PyYAML is installed."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return load_toml(TrainConfig, path)
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write it as TOML"
        ) from None
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML or TOML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return from_dict(TrainConfig, {str(k).replace("-", "_"): v for k, v in values.items()}, source=str(path))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the ``--config`` file's values, overridden by every flag given on the line."""
    if not getattr(args, "config", None):
        return from_args(TrainConfig, args)
    values: dict[str, Any] = dataclasses.asdict(load_config_file(args.config))
    for name in getattr(args, _EXPLICIT, set()):
        values[name] = getattr(args, name)
    if isinstance(values.get("optimizer_option"), list):
        values["optimizer_option"] = tuple(values["optimizer_option"])
    return from_dict(TrainConfig, values, source=f"{args.config} and command line")


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; returns the exit status (bad input raises ConfigError -> status 2).

    A distributed strategy started outside torchrun launches ``--workers`` processes of this same command
    under torchrun on this machine (the resolved config travels as ``OUT/launch.toml``); inside torchrun
    each process trains as one replica.
    """
    config = config_from_args(args)
    validate_config(config)
    if config.strategy == "single":
        if config.workers != 1:
            raise ConfigError(
                f"--workers {config.workers} needs a distributed strategy; add e.g. --strategy sync"
            )
        if in_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "started by torchrun with several processes but --strategy single; every process would "
                "train alone and write the same run directory -- pass e.g. --strategy sync"
            )
    elif config.strategy == "hogwild" and not in_torchrun():
        from distlearn.parallel.hogwild import launch_hogwild

        launch_hogwild(config)  # torch.multiprocessing processes sharing memory, not a torchrun job
        return 0
    elif config.strategy == "dni" and not in_torchrun():
        from distlearn.parallel.dni import launch_stages

        return launch_stages(config)  # one process per stage: --workers defaults to --stages
    elif not in_torchrun():
        return launch_workers(config)
    train(config)
    return 0


def launch_workers(config: TrainConfig) -> int:
    """Start ``config.workers`` processes of ``distlearn train`` under torchrun on 127.0.0.1."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    launch_file = out / "launch.toml"
    launch_file.write_text(to_toml(config))
    print(
        f"distlearn train: starting {config.workers} worker(s) with torchrun on 127.0.0.1 "
        f"({config.strategy} strategy; config in {launch_file})",
        flush=True,
    )
    return launch_local(["distlearn", "train", "--config", str(launch_file)], config.workers)
