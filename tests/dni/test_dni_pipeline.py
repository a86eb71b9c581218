"""Decoupled neural interfaces across processes: real jobs of 3 ranks on 127.0.0.1 (one stage per rank).

* Model-parallel backprop on 3 ranks ends with the weights of one process's backprop (Adam, same batches)
  to 1e-5: the wire carries the right activations and gradients, in the right order.
* The same with batch normalisation (``batch_norm``): the assembled network's weights, running statistics
  and step counts equal one process's to 1e-5 (each stage's buffers travel to rank 0 with its weights), and
  rank 0 evaluates it in eval mode (the running statistics, not the test batch's).
* A DNI job: every rank receives each activation / gradient once, in step order, with the interface's shape
  and the sender's version (activations are computed before the sender's update of that step, gradients
  after it), gradients arrive within the lag bound; every synthetic-gradient model was fitted on every step.
* The top stage dies in the middle: every other rank ends by itself with a CommError naming the peer, well
  within the deadline, no hang.
* The run directory holds the trainer's records: rank 0's metrics.jsonl has the top rank's training records
  (as the top rank wrote them), an eval record per epoch and the summary, so ``distlearn plot`` draws it.
* The batch order is the trainer's (``epoch_batches`` of one replica), and that is the seeded permutation of
  each epoch cut into full batches (written out here).

Each rank is a plain process with the rendezvous in its environment (as separate nodes would be), running
``python -m distlearn.dni.cli`` on a small seeded subset of MNIST (../shared/data).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distlearn.config import load_toml, to_toml
from distlearn.data import load_dataset
from distlearn.dni.pipeline import DNIConfig, batch_indices
from distlearn.dni.stages import build_model
from distlearn.metrics import read_metrics
from distlearn.models.transforms import BatchTransform
from distlearn.parallel.base import epoch_batches
from ranks import run_ranks

RANKS = 3
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _config(out: Path, data: Path, **changes) -> DNIConfig:
    values = dict(
        dataset="mnist", data_root=str(data), stages=RANKS, batch_size=64, train_samples=640,
        test_samples=200, steps=12, out=str(out), log_every=4, timeout_s=20.0, quiet=True,
    )  # fmt: skip
    values.update(changes)
    return DNIConfig(**values)


def run_job(configs: list[DNIConfig], out: Path, timeout: float = 120) -> tuple[list[int], float]:
    """Run ``configs`` in turn on one job of ``RANKS`` processes; their exit codes and the seconds it took.

    One config runs through ``python -m distlearn.dni.cli`` (the real entry point); several run through
    dni_worker.py, which keeps the process group between them (one start-up for several cases).
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, config in enumerate(configs):
        paths.append(str(out / f"case{index}.toml"))
        Path(paths[-1]).write_text(to_toml(config))
    if len(configs) == 1:
        command = [sys.executable, "-m", "distlearn.dni.cli", "--config", paths[0]]
    else:
        command = [sys.executable, str(Path(__file__).resolve().parent / "dni_worker.py"), *paths]
    started = time.monotonic()
    codes = run_ranks(command, RANKS, out, timeout)
    return codes, time.monotonic() - started


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("log*.txt")))


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One job: model-parallel backprop (out/bp), cDNI recording every message (out/dni), backprop with
    batch norm (out/bpbn)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is not present on this machine")
    out = tmp_path_factory.mktemp("dni-job")
    configs = [
        _config(out / "bp", SHARED_DATA, mode="backprop", save_model=True),
        _config(out / "dni", SHARED_DATA, mode="dni", cdni=True, record_messages=True),
        _config(out / "bpbn", SHARED_DATA, mode="backprop", batch_norm=True, save_model=True),
    ]
    codes, _ = run_job(configs, out)
    assert codes == [0] * RANKS, logs(out)
    return out


def _one_process(config: DNIConfig) -> tuple[nn.Module, BatchTransform]:
    """The reference: one process, the whole network, the same seed, subset, batches and optimizer."""
    train = load_dataset("mnist", "train", root=config.data_root)
    subset = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(config.seed))
    subset = subset[: config.train_samples].sort().values
    images, labels = train.images[subset], train.labels[subset]
    transform = BatchTransform(train.mean, train.std)
    torch.manual_seed(config.seed)
    model = build_model("mlp", stages=RANKS, batch_norm=config.batch_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    assert config.steps is not None
    for step in range(config.steps):
        indices = batch_indices(step, len(labels), batch=config.batch_size, seed=config.seed)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(transform(images[indices])), labels[indices]).backward()
        optimizer.step()
    return model, transform


def test_model_parallel_backprop_equals_one_process(finished_job: Path) -> None:
    config = load_toml(DNIConfig, finished_job / "case0.toml")
    model, _ = _one_process(config)
    trained = torch.load(finished_job / "bp" / "model.pt", weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=0, msg=name)
    summary = json.loads((finished_job / "bp" / "summary.json").read_text())
    assert summary["steps"] == config.steps
    assert all(0 < stage["utilisation"] <= 1 for stage in summary["stages"])


def test_batch_norm_stages_equal_one_process_and_evaluate_on_running_statistics(finished_job: Path) -> None:
    config = load_toml(DNIConfig, finished_job / "case2.toml")
    assert config.batch_norm and config.steps is not None
    model, transform = _one_process(config)
    reference = model.state_dict()
    trained = torch.load(finished_job / "bpbn" / "model.pt", weights_only=True)
    assert trained.keys() == reference.keys()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    norms = [name for name in reference if name.endswith(buffers)]
    assert len(norms) == 3 * RANKS  # every stage's buffers, the two stages above rank 0 included
    for name, value in reference.items():
        torch.testing.assert_close(trained[name].to(value.dtype), value, atol=1e-5, rtol=0, msg=name)
    assert all(int(trained[name]) == config.steps for name in norms if name.endswith("num_batches_tracked"))

    # Rank 0's evaluation is the reference in eval mode (running statistics); in train mode (the test
    # batch's own statistics) the loss differs, so this tells the two apart.
    test = load_dataset("mnist", "test", root=config.data_root)
    x, y = transform(test.images[: config.test_samples]), test.labels[: config.test_samples]
    losses = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            model.train(mode == "train")
            losses[mode] = float(nn.functional.cross_entropy(model(x), y))
    summary = json.loads((finished_job / "bpbn" / "summary.json").read_text())
    assert abs(summary["test_loss"] - losses["eval"]) < 1e-4, (summary["test_loss"], losses)
    assert abs(losses["train"] - losses["eval"]) > 1e-3, losses


def test_dni_messages_cross_ranks_with_shapes_and_versions(finished_job: Path) -> None:
    config = load_toml(DNIConfig, finished_job / "case1.toml")
    steps = config.steps
    assert steps is not None
    widths = [784, 256, 256, 256]  # interface k carries stage k's output (the MLP's hidden layers)
    for rank in range(RANKS):
        messages = json.loads((finished_job / "dni" / f"messages.rank{rank}.json").read_text())
        activations = [m for m in messages if m["kind"] == "ACTIVATION"]
        gradients = [m for m in messages if m["kind"] == "GRADIENT"]
        if rank == 0:
            assert activations == []
        else:
            assert [m["step"] for m in activations] == list(range(steps))
            assert all(m["sender"] == rank - 1 for m in activations)
            assert all(m["version"] == m["step"] for m in activations)  # sent before the sender's update
            assert all(m["shape"] == [widths[rank]] for m in activations)
        if rank == RANKS - 1:
            assert gradients == []
        else:
            assert [m["step"] for m in gradients] == list(range(steps))
            assert all(m["sender"] == rank + 1 for m in gradients)
            assert all(m["version"] == m["step"] + 1 for m in gradients)  # sent after the sender's update
            assert all(m["shape"] == [widths[rank + 1]] for m in gradients)
            delays = [m["received_at_step"] - 1 - m["step"] for m in gradients]
            assert all(0 <= d <= config.max_lag for d in delays), delays
    summary = json.loads((finished_job / "dni" / "summary.json").read_text())
    assert summary["mode"] == "dni-cdni"
    for rank, stage in enumerate(summary["stages"]):
        assert stage["steps"] == steps
        assert stage["sg_updates"] == (steps if rank < RANKS - 1 else 0)
        assert 0 < stage["utilisation"] <= 1
    assert 0 <= summary["test_accuracy"] <= 1 and summary["samples_per_s"] > 0


def test_a_dying_stage_ends_the_job_with_a_clear_error(tmp_path: Path, shared_data: Path) -> None:
    config = _config(tmp_path / "die", shared_data, mode="dni", steps=40, die_at_step=5, timeout_s=10.0)
    codes, seconds = run_job([config], tmp_path / "die", timeout=90)
    assert codes[RANKS - 1] == 17, logs(tmp_path / "die")  # the stage that died, at step 5
    assert all(code == 2 for code in codes[: RANKS - 1]), logs(tmp_path / "die")  # the others: CommError
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    neighbour = (tmp_path / "die" / f"log{RANKS - 2}.txt").read_text()
    assert "distlearn dni: error: rank 1" in neighbour and f"rank {RANKS - 1}" in neighbour, neighbour
    bottom = (tmp_path / "die" / "log0.txt").read_text()
    assert "distlearn dni: error: rank 0" in bottom, bottom


def test_the_run_directory_has_the_trainers_records_and_plots(finished_job: Path, tmp_path: Path) -> None:
    config = load_toml(DNIConfig, finished_job / "case1.toml")
    assert config.steps is not None and config.train_samples is not None
    steps_per_epoch = config.train_samples // config.batch_size
    records = read_metrics(finished_job / "dni")
    top = read_metrics(finished_job / "dni" / f"metrics.rank{RANKS - 1}.jsonl")
    train = [r for r in records if r.kind == "train"]
    log_steps = list(range(config.log_every, config.steps + 1, config.log_every))
    assert [r.step for r in train] == [r.step for r in top] == log_steps
    for forwarded, written in zip(train, top, strict=True):  # the same numbers, sent in float64
        for key in ("epoch", "wall_time", "loss", "accuracy", "samples_per_s", "lr", "bytes_sent", "extra"):
            assert getattr(forwarded, key) == getattr(written, key), key
    assert all(r.extra == {"stage": RANKS - 1} and r.samples_per_s > 0 for r in train)
    assert all(b.wall_time > a.wall_time for a, b in itertools.pairwise(train))  # seconds since the start
    # Every step is in one window, so the windows' mean loss is the summary's training loss.
    summary = records[-1]
    assert summary.kind == "summary"
    mean_loss = sum(r.loss for r in train) / len(train)
    assert abs(mean_loss - summary.extra["train_loss"]) < 1e-5
    evals = [r for r in records if r.kind == "eval"]
    assert [r.step for r in evals] == [steps_per_epoch, config.steps]
    assert [r.accuracy for r in evals] == [e["test_accuracy"] for e in summary.extra["evaluations"]]
    pytest.importorskip("matplotlib")
    from distlearn.plot_cli import plot_runs

    assert plot_runs([finished_job / "dni"], tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(("n", "batch", "seed"), [(640, 64, 0), (517, 50, 3), (100, 7, 1)])
def test_the_batch_order_is_the_trainers(n: int, batch: int, seed: int) -> None:
    steps_per_epoch = n // batch
    cache: dict = {}
    for epoch in range(3):
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        trainer = list(epoch_batches(n, global_batch=batch, seed=seed, epoch=epoch))
        assert len(trainer) == steps_per_epoch
        for position in range(steps_per_epoch):
            step = epoch * steps_per_epoch + position
            expected = permutation[position * batch : (position + 1) * batch]
            assert torch.equal(trainer[position], expected)
            assert torch.equal(batch_indices(step, n, batch=batch, seed=seed, cache=cache), expected)
            assert torch.equal(batch_indices(step, n, batch=batch, seed=seed), expected)
