"""Hogwild!: processes really share one copy of the weights; a run trains and every process ends by itself.

Real processes started with torch.multiprocessing (spawn), as ``distlearn train --strategy hogwild`` does.
"""

from __future__ import annotations

import queue
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hogwild_cases import visibility  # noqa: E402

from distlearn.errors import CommError, ConfigError  # noqa: E402
from distlearn.parallel import create_strategy  # noqa: E402
from distlearn.parallel.hogwild import (  # noqa: E402
    Hogwild,
    HogwildChannel,
    launch_hogwild,
    stochastic_round,
)
from distlearn.train import TrainConfig, train  # noqa: E402


@pytest.mark.timeout(90)
def test_a_step_by_one_process_is_seen_by_the_other():
    context = mp.get_context("spawn")
    channel = HogwildChannel(buffers=context.Queue(), barrier=context.Barrier(2))
    results = context.Queue()
    processes = [context.Process(target=visibility, args=(r, channel, None, results)) for r in range(2)]
    for process in processes:
        process.start()
    seen: dict[tuple[int, str], torch.Tensor] = {}
    try:
        while len(seen) < 2 + 4 * 2:
            rank, label, flat = results.get(timeout=60)
            seen[(rank, label)] = torch.tensor(flat, dtype=torch.float32)
    except queue.Empty:
        pytest.fail(f"the hogwild processes reported only {sorted(seen)} within 60 s")
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
                process.join()
    assert all(process.exitcode == 0 for process in processes)
    torch.manual_seed(100)
    initial_rank0 = torch.cat([p.detach().reshape(-1) for p in torch.nn.Linear(3, 2).parameters()])
    torch.manual_seed(101)
    initial_rank1 = torch.cat([p.detach().reshape(-1) for p in torch.nn.Linear(3, 2).parameters()])
    assert not torch.equal(initial_rank0, initial_rank1)
    assert torch.equal(seen[(0, "after-prepare")], initial_rank0)
    assert torch.equal(seen[(1, "after-prepare")], initial_rank0)  # process 1 now holds process 0's copy
    previous = initial_rank0
    for turn in range(4):
        writer, reader = turn % 2, 1 - turn % 2
        written = seen[(writer, f"wrote-{turn}")]
        assert not torch.equal(written, previous)  # the step changed the weights ...
        assert torch.equal(seen[(reader, f"read-{turn}")], written)  # ... and the other process sees it
        previous = written


@pytest.mark.timeout(150)
def test_two_processes_train_one_model(tmp_path):
    config = TrainConfig.build(
        dataset="fashion-mnist", model="mlp", optimizer="sgd", lr=0.05, batch_size=64, steps=40,
        train_samples=2048, test_samples=1000, workers=2, strategy="hogwild", threads=1,
        checkpoints=False, progress="off", tensorboard="off", quiet=True, out=str(tmp_path),
    )  # fmt: skip
    summaries = launch_hogwild(config, train=train, timeout_s=120)
    assert sorted(summaries) == [0, 1]
    assert summaries[0]["weights_checksum"] == summaries[1]["weights_checksum"]  # one copy of the weights
    assert summaries[0]["test_accuracy"] > 0.6  # chance is 0.1
    assert summaries[0]["steps"] == summaries[1]["steps"] == 40
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.rank1.jsonl").is_file()


@pytest.mark.timeout(120)
def test_a_failing_process_ends_the_run_with_an_error(tmp_path):
    config = TrainConfig.build(
        dataset="fashion-mnist", model="mlp", workers=2, strategy="hogwild", threads=1, comm_timeout=60,
        data_root=str(tmp_path / "no-such-directory"), checkpoints=False, progress="off",
        tensorboard="off", quiet=True, out=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(CommError, match="hogwild failed"):
        launch_hogwild(config, train=train, timeout_s=90)


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="shared channel"):
        Hogwild(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="valid place"):
        Hogwild(rank=2, world_size=2)
    with pytest.raises(ConfigError, match="torch.multiprocessing"):
        create_strategy("hogwild", run=TrainConfig.build(strategy="hogwild", workers=2))
    assert isinstance(create_strategy("hogwild", run=TrainConfig.build(strategy="hogwild")), Hogwild)


@pytest.mark.timeout(150)
def test_buckwild_two_processes_train_one_8bit_model(tmp_path):
    config = TrainConfig.build(
        dataset="fashion-mnist", model="mlp", optimizer="sgd", lr=0.05, batch_size=64, steps=100,
        train_samples=2048, test_samples=1000, workers=2, strategy="hogwild", buckwild=True, threads=1,
        checkpoints=False, progress="off", tensorboard="off", quiet=True, out=str(tmp_path),
    )  # fmt: skip
    summaries = launch_hogwild(config, train=train, timeout_s=120)
    assert summaries[0]["weights_checksum"] == summaries[1]["weights_checksum"]  # both read the shared codes
    assert summaries[0]["test_accuracy"] > 0.6  # chance 0.1; 100 steps: 0.76-0.77 here (40: 0.59-0.70)
    with pytest.raises(ConfigError, match="buckwild is an option of --strategy hogwild, not sync"):
        from distlearn.train import validate_config

        validate_config(TrainConfig.build(strategy="sync", buckwild=True))


def test_stochastic_rounding_is_unbiased_and_buckwild_moves_by_the_update_in_expectation():
    generator = torch.Generator().manual_seed(0)
    x = torch.full((20000,), 0.3, dtype=torch.float64)
    rounded = stochastic_round(x, generator)
    assert set(rounded.unique().tolist()) == {0.0, 1.0}
    assert abs(float(rounded.mean()) - 0.3) < 5 * (0.3 * 0.7 / 20000) ** 0.5

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    strategy = Hogwild(buckwild=True)
    strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert strategy.shared is not None and strategy.shared.dtype == torch.int8 and strategy.scales is not None
    weight_scale = float(strategy.scales[0])
    read = model.weight.detach().clone()
    assert torch.allclose(read / weight_scale, (read / weight_scale).round(), atol=1e-4)  # on the grid
    codes_before = strategy.shared[:12].clone().to(torch.int64)
    steps = 400
    for step in range(steps):  # an update of 0.3 grid steps each time: the codes move 0.3 per step on average
        with torch.no_grad():
            model.weight.add_(0.3 * weight_scale)
        strategy.after_step(model, None, step)  # type: ignore[arg-type]
    moved = (strategy.shared[:12].to(torch.int64) - codes_before).double()
    assert abs(float(moved.mean()) - 0.3 * steps) < 5 * (steps * 0.21 / 12) ** 0.5
    assert torch.allclose(model.weight.detach(), strategy.shared[:12].float().view(3, 4) * weight_scale)
    with torch.no_grad():  # far beyond the grid: clipped at 127 and counted
        model.weight.add_(1000 * weight_scale)
    strategy.after_step(model, None, steps)  # type: ignore[arg-type]
    assert int(strategy.shared[:12].max()) == 127 and strategy.saturated >= 12
