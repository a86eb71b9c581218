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
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn.checkpoint import list_checkpoints, load_checkpoint
from distlearn.data import check_dataset
from distlearn.errors import CheckpointError, CommError, ConfigError
from distlearn.launch import in_torchrun, launch_local, restart_count
from distlearn.metrics import METRICS_FILE, read_metrics
from distlearn.models import create_model
from distlearn.models.factory import is_import_path
from distlearn.parallel import strategy_class
from distlearn.ranklaunch import launch_ranks
from distlearn.rundir import prepare_out
from distlearn.train.config import TrainConfig, config_to_toml, validate_config
from distlearn.train.inputs import check_fit, check_importable, resolve_inputs, run_data
from distlearn.train.report import TrainResult

__all__ = [
    "after_restart",
    "check_gpus",
    "launch_from_python",
    "launch_workers",
    "newest_loadable_checkpoint",
    "processes_to_launch",
    "read_result",
    "run_config",
]

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
    check_gpus(config, processes_to_launch(config))
    if not is_import_path(config.dataset):
        check_dataset(config.dataset, config.data_root)  # the files' headers: quick, before any worker
    model, loss_fn, train_data, test_data = resolve_inputs(config, None, None, None, None)
    if model is not None or train_data is not None:
        check_fit(config, model, loss_fn, run_data(config, train_data, test_data))


def check_gpus(config: TrainConfig, processes: int) -> None:
    """On CUDA each process this machine starts computes on a GPU of its own (``cuda:LOCAL_RANK``): more
    processes than GPUs is refused here, before any starts (the parameter server's ranks share them)."""
    cls = strategy_class(config.strategy)
    if config.device == "cpu" or cls.shares_device or config.options.cuda_refusal():
        return
    if not torch.cuda.is_available():  # auto: the CPU (cuda was refused by validate_config)
        return
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise ConfigError(
            f"--device {config.device}: each of the {processes} processes would compute on a GPU of its own "
            f"(cuda:LOCAL_RANK) but this machine shows {gpus}; use --workers {gpus} or fewer, or --device cpu"
        )


def run_config(config: TrainConfig, train: TrainFn) -> int:
    """``distlearn train``: check ``config`` whole, then train here or start the job's processes."""
    config = after_restart(config)
    validate_config(config)
    check_importable(config)
    prepare_out(config)  # an earlier run in --out: refused, or removed with --overwrite
    processes = processes_to_launch(config)
    check_restarts(config, processes)
    if not processes:
        train(config)
        return 0
    check_before_launch(config)
    if strategy_class(config.strategy).launcher == "pool":
        strategy_class(config.strategy).launch(config, train)
        return 0
    return launch_workers(dataclasses.replace(config, workers=processes))


def check_restarts(config: TrainConfig, processes: int) -> None:
    """``--max-restarts`` needs a job that torchrun starts here; without checkpoints a restart starts over."""
    if not config.max_restarts or in_torchrun():  # under a user's torchrun, its own --max-restarts rules
        return
    launcher = strategy_class(config.strategy).launcher
    if not processes or launcher != "torchrun":
        what = {
            "pool": f"runs a local process pool (--strategy {config.strategy})",
            "ranks": f"runs plain processes that outlive a lost worker (--strategy {config.strategy})",
        }.get(launcher, "") if processes else "is one process"
        raise ConfigError(
            f"--max-restarts {config.max_restarts} restarts the workers of a torchrun job, and this run "
            f"{what}; "
            "drop --max-restarts, or use a strategy whose workers torchrun starts (e.g. --strategy sync "
            "--workers 2)"
        )
    if not config.checkpoints:
        print(
            "distlearn train: warning: --max-restarts with --no-checkpoints: a restarted job starts over",
            file=sys.stderr,
        )
    elif not config.checkpoint_every:
        print(
            "distlearn train: warning: --max-restarts without --checkpoint-every: a restarted job resumes "
            "from the end of the last finished epoch (add --checkpoint-every N to lose at most N steps)",
            file=sys.stderr,
        )


def after_restart(config: TrainConfig) -> TrainConfig:
    """In a worker that torchrun restarted: ``config`` resuming from the newest checkpoint in OUT/checkpoints.

    On a first attempt ``config`` itself. After a restart the run continues from the newest checkpoint of
    ``OUT/checkpoints`` that loads, as ``--resume`` would (records after its step are cut from the metrics);
    with none there it continues from the user's ``--resume`` if one was given, else it starts over, the
    failed attempt's files removed (as ``--overwrite`` would).
    """
    attempt = restart_count()
    if not attempt or not in_torchrun():
        return config
    newest = newest_loadable_checkpoint(Path(config.out) / "checkpoints")
    if newest is not None and config.resume == str(newest) and not config.overwrite:
        return config  # done already (distlearn train's worker, then its train())
    if newest is not None:
        config = dataclasses.replace(config, resume=str(newest), overwrite=False)
        how = f"resuming from {newest}"
    elif config.resume is not None:
        config = dataclasses.replace(config, overwrite=False)
        how = f"no checkpoint in {Path(config.out) / 'checkpoints'}; resuming from --resume {config.resume}"
    else:
        config = dataclasses.replace(config, overwrite=True)
        how = f"no checkpoint in {Path(config.out) / 'checkpoints'}; starting over"
    if os.environ.get("RANK") == "0":
        most = os.environ.get("TORCHELASTIC_MAX_RESTARTS", str(config.max_restarts))
        print(f"distlearn train: restart {attempt} of {most}: {how}", file=sys.stderr, flush=True)
    return config


def newest_loadable_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint in ``directory`` that loads (a corrupt or cut one is passed over), or None."""
    for path in reversed(list_checkpoints(directory)):
        try:
            load_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


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
    return launch_local(
        program,
        config.workers,
        max_restarts=config.max_restarts,
        comm_timeout_s=getattr(config.options, "comm_timeout", None),
    )


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
