"""Where a run's processes start: here, under torchrun on this machine, or in a local process pool.

    status = run_config(config, train)                # distlearn train: train here or launch; exit status
    result = launch_from_python(config, train, [])    # distlearn.train.train(config) outside torchrun

One decision for the command line and the Python API. Inside torchrun (or a worker this module started)
every process trains as one replica. Outside it, a strategy whose job has several processes
(``Strategy.processes``: ``--workers``, DNI's stages) is started on this machine: torchrun running
``distlearn train --config OUT/launch.toml`` (the resolved config), or, for a ``"pool"`` strategy
(Hogwild!'s shared memory), its own process pool. From Python the call then returns rank 0's result read
back from the run directory: the summary and evaluations from ``OUT/metrics.jsonl``, the final checkpoint
and the model loaded from it.

A user's model, loss or data given as Python objects cannot cross into new processes; with several
processes they must be named by import path (``--model pkg.mod:factory``, ...), which each worker imports.
Everything that can be checked before a worker starts is: the config, the import paths, and one forward
pass of the model on the data (:func:`distlearn.train.inputs.check_fit`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.checkpoint import load_checkpoint
from distlearn.errors import CommError, ConfigError
from distlearn.launch import in_torchrun, launch_local
from distlearn.metrics import METRICS_FILE, read_metrics
from distlearn.models import create_model
from distlearn.parallel import strategy_class
from distlearn.ranklaunch import launch_ranks
from distlearn.rundir import prepare_out
from distlearn.train.config import TrainConfig, config_to_toml, validate_config
from distlearn.train.inputs import check_fit, check_importable, resolve_inputs, run_data
from distlearn.train.report import TrainResult

__all__ = ["launch_from_python", "launch_workers", "processes_to_launch", "read_result", "run_config"]

TrainFn = Callable[..., Any]


def processes_to_launch(config: TrainConfig) -> int:
    """How many processes this call must start (0: train in this process)."""
    if in_torchrun():
        return 0
    processes = strategy_class(config.strategy).processes(config.options, config)
    return processes if processes > 1 else 0


def check_before_launch(config: TrainConfig) -> None:
    """Everything a worker would find wrong, found here: the config, its import paths, the data's fit."""
    validate_config(config)
    check_importable(config)
    model, loss_fn, train_data, test_data = resolve_inputs(config, None, None, None, None)
    if model is not None or train_data is not None:
        check_fit(config, model, loss_fn, run_data(config, train_data, test_data))


def run_config(config: TrainConfig, train: TrainFn) -> int:
    """``distlearn train``: check ``config`` whole, then train here or start the job's processes."""
    validate_config(config)
    check_importable(config)
    prepare_out(config)  # an earlier run in --out: refused, or removed with --overwrite
    processes = processes_to_launch(config)
    if not processes:
        train(config)
        return 0
    check_before_launch(config)
    if strategy_class(config.strategy).launcher == "pool":
        strategy_class(config.strategy).launch(config, train)
        return 0
    return launch_workers(dataclasses.replace(config, workers=processes))


def launch_workers(config: TrainConfig) -> int:
    """Start ``config.workers`` processes of ``distlearn train`` under torchrun on 127.0.0.1."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    launch_file = out / "launch.toml"
    launch_file.write_text(config_to_toml(config))
    program = ["distlearn", "train", "--config", str(launch_file)]
    cls = strategy_class(config.strategy)
    how = "as plain processes" if cls.launcher == "ranks" else "with torchrun"
    print(
        f"distlearn train: starting {config.workers} worker(s) {how} on 127.0.0.1 "
        f"({config.strategy} strategy; config in {launch_file})",
        flush=True,
    )
    if cls.launcher == "ranks":  # the strategy's own failure policy (a lost ps worker stops nobody)
        return launch_ranks(program, config.workers, cls.rank_policy(config.options, config))
    return launch_local(program, config.workers)


def launch_from_python(config: TrainConfig, train: TrainFn, objects: list[str]) -> TrainResult | None:
    """``train(config)`` outside torchrun: None to train in this process, else the launched job's result."""
    processes = processes_to_launch(config)
    if not processes:
        return None
    if objects:
        given = ", ".join(f"{name}=" for name in objects)
        raise ConfigError(
            f"{given} holds Python objects, which cannot cross into the {processes} worker processes that "
            f"--strategy {config.strategy} with workers={config.workers} starts; name them by import path "
            "instead (TrainConfig(model='pkg.mod:factory', dataset='pkg.mod:factory', loss='pkg.mod:fn')), "
            "or start the job with torchrun and call train() in each process"
        )
    check_before_launch(config)
    if strategy_class(config.strategy).launcher == "pool":
        strategy_class(config.strategy).launch(config, train)
    else:
        status = launch_workers(dataclasses.replace(config, workers=processes))
        if status != 0:
            raise CommError(
                f"the {processes} workers of --strategy {config.strategy} ended with exit status {status}; "
                "their messages are above"
            )
    return read_result(config)


def read_result(config: TrainConfig) -> TrainResult:
    """Rank 0's result of a finished run, read back from ``config.out``."""
    path = Path(config.out) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"the job wrote no {path}; it did not train (see its messages above)")
    records = read_metrics(path)
    summaries = [r for r in records if r.kind == "summary"]
    if not summaries:
        raise ConfigError(f"{path} has no summary record: the job ended before it finished")
    summary = dict(summaries[-1].extra or {})
    evaluations = [r for r in records if r.kind == "eval"]
    checkpoint = Path(summary["checkpoint"]) if summary.get("checkpoint") else None
    classification = summary.get("classification", True)
    accuracy = summary.get("test_accuracy")
    best = summary.get("best_accuracy")
    test_loss = summary.get("test_loss")
    return TrainResult(
        model=_saved_model(config, checkpoint),
        test_accuracy=(math.nan if accuracy is None else accuracy) if classification else None,
        test_loss=math.nan if test_loss is None else test_loss,
        best_accuracy=math.nan if best is None else best,
        steps=summary.get("steps", summaries[-1].step),
        epochs=summary.get("epochs", 0.0),
        samples_per_s=summaries[-1].samples_per_s or 0.0,
        train_seconds=summary.get("train_seconds", 0.0),
        wall_time=summaries[-1].wall_time,
        seconds_per_epoch=list(summary.get("seconds_per_epoch", [])),
        metrics_path=path,
        checkpoint=checkpoint,
        evaluations=evaluations,
        summary=summary,
    )


def _saved_model(config: TrainConfig, checkpoint: Path | None) -> nn.Module:
    """The final model: built as the workers built it, with the checkpoint's weights (Identity if none)."""
    if checkpoint is None or not checkpoint.is_file():
        return nn.Identity()
    state = load_checkpoint(checkpoint)["model"]
    model, _, train_data, test_data = resolve_inputs(config, None, None, None, None)
    if model is None:
        data = run_data(config, train_data, test_data)
        channels, height, _ = data.image_shape
        model = create_model(
            config.model, in_channels=channels, num_classes=data.num_classes, image_size=height
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    with torch.no_grad():
        model.load_state_dict(state)
    return model
