"""Checkpoint integrity: a checksum verified on load, a CheckpointError (never a traceback) for every
malformed file naming it and the last good checkpoint, and writes that clean up after a full disk."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distlearn import checkpoint
from distlearn.checkpoint import (
    ENVELOPE,
    FORMAT,
    list_checkpoints,
    load_checkpoint,
    read_verified,
    save_checkpoint,
)
from distlearn.errors import CheckpointError, ConfigError
from distlearn.rl.checkpointing import save_rl_checkpoint
from distlearn.train import TrainConfig, train
from distlearn.train_cli import command

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig.build(
        model="mlp", optimizer="adam", lr=1e-3, epochs=1, batch_size=32, checkpoint_every=4, log_every=4,
        out=str(tmp_path / "run"), progress="off", tensorboard="off", quiet=True,
    )  # fmt: skip
    return replace(base, **changes)


@pytest.fixture
def written(tmp_path, synthetic):
    """A finished run of 12 steps: checkpoints of steps 8 and 12, and its config."""
    cfg = config(tmp_path)
    result = train(cfg, train_data=synthetic[0], test_data=synthetic[1])
    directory = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(directory)] == ["step-00000008.pt", "step-00000012.pt"]
    return cfg, directory, result


def resume(cfg, synthetic, path):
    return train(replace(cfg, epochs=2, resume=str(path)), train_data=synthetic[0], test_data=synthetic[1])


def test_a_checkpoint_is_a_checksummed_envelope_loadable_with_weights_only(written):
    _, directory, result = written
    raw = torch.load(directory / "step-00000012.pt", weights_only=True)
    assert raw["format"] == ENVELOPE and len(raw["sha256"]) == 64 and raw["payload"].dtype == torch.uint8
    state = load_checkpoint(directory)
    assert state["format"] == FORMAT and state["position"]["step"] == 12
    for key, value in result.model.state_dict().items():
        assert torch.equal(state["model"][key], value)


def test_one_flipped_bit_fails_the_checksum_and_names_the_last_good_checkpoint(written, synthetic):
    cfg, directory, _ = written
    newest, previous = directory / "step-00000012.pt", directory / "step-00000008.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit in the middle: inside the serialized weights
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(newest)
    message = str(caught.value)
    assert f"checkpoint {newest} fails its checksum" in message
    assert f"the last good checkpoint is {previous}: resume from it with --resume {previous}" in message

    # resuming from the directory (its newest) is refused the same way; the named checkpoint resumes
    with pytest.raises(CheckpointError, match="fails its checksum"):
        resume(cfg, synthetic, directory)
    assert resume(cfg, synthetic, previous).steps == 24


@pytest.mark.parametrize(
    "content,expected",
    [
        (lambda data: data[: len(data) // 3], "truncated or corrupt"),
        (lambda data: random.Random(0).randbytes(4096), "truncated or corrupt"),
        (lambda data: b"step = 12\nthis is a text file, not a checkpoint\n", "truncated or corrupt"),
        (lambda data: b"", "truncated or corrupt"),
    ],
    ids=["truncated", "random-bytes", "text-file", "empty"],
)
def test_every_malformed_file_is_a_checkpoint_error(written, content, expected):
    _, directory, _ = written
    newest, previous = directory / "step-00000012.pt", directory / "step-00000008.pt"
    newest.write_bytes(content(newest.read_bytes()))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(directory)
    message = str(caught.value)
    assert str(newest) in message and expected in message and f"--resume {previous}" in message


class NotATensor:
    """A Python object, which a checkpoint must not hold (weights_only loading refuses it)."""


def test_a_file_that_is_no_distlearn_checkpoint(tmp_path):
    path = tmp_path / "step-00000001.pt"
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="is not a distlearn checkpoint"):
        load_checkpoint(path)
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match="there is no other good checkpoint"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "model": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"refuses \(.*NotATensor\); save only tensors"):
        load_checkpoint(path)


def test_a_checkpoint_without_checksum_loads_with_a_warning(written, synthetic):
    cfg, directory, _ = written
    state = load_checkpoint(directory / "step-00000008.pt")
    state.pop("path")
    old = directory / "step-00000009.pt"
    torch.save(state, old)  # the format before checksums: the state dict at the top level
    with pytest.warns(UserWarning, match="without checksums: it is loaded unverified"):
        assert load_checkpoint(old)["position"]["step"] == 8
    with pytest.warns(UserWarning):
        assert resume(cfg, synthetic, old).steps == 24


def test_missing_entries_are_a_checkpoint_error_naming_the_entry(written, synthetic):
    cfg, directory, _ = written
    state = load_checkpoint(directory / "step-00000012.pt")
    for key in ("path", "format", "optimizer"):
        state.pop(key)
    save_checkpoint(state, directory, 13, keep=5)
    with pytest.raises(CheckpointError) as caught:
        resume(cfg, synthetic, directory / "step-00000013.pt")
    message = str(caught.value)
    assert "step-00000013.pt has no entry 'optimizer'" in message
    assert f"--resume {directory / 'step-00000012.pt'}" in message  # the newest good one


def test_a_tensor_of_the_wrong_shape_names_the_tensor_and_both_shapes(written, synthetic):
    cfg, directory, _ = written
    state = load_checkpoint(directory / "step-00000012.pt")
    state.pop("path")
    state.pop("format")
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(7, 3)
    save_checkpoint(state, directory, 13, keep=5)
    with pytest.raises(CheckpointError) as caught:
        resume(cfg, synthetic, directory / "step-00000013.pt")
    message = str(caught.value)
    shape = tuple(load_checkpoint(directory / "step-00000012.pt")["model"][name].shape)
    assert f"does not fit this model: {name} is (7, 3) in the checkpoint but {shape} in the model" in message

    # entries of another model: named too
    del state["model"][name]
    state["model"]["extra.weight"] = torch.zeros(2)
    save_checkpoint(state, directory, 14, keep=5)
    with pytest.raises(
        CheckpointError, match=rf"it lacks {name}; it has entries the model lacks: extra.weight"
    ):
        resume(cfg, synthetic, directory / "step-00000014.pt")


def test_a_checkpoint_of_another_model_or_optimizer_names_the_flag(written, synthetic):
    cfg, directory, _ = written
    with pytest.raises(ConfigError, match="--model 'mlp'"):
        train(replace(cfg, model="lenet", epochs=2, resume=str(directory)), train_data=synthetic[0],
              test_data=synthetic[1])  # fmt: skip
    with pytest.raises(ConfigError, match="--optimizer 'adam'"):
        train(replace(cfg, optimizer="sgd", epochs=2, resume=str(directory)), train_data=synthetic[0],
              test_data=synthetic[1])  # fmt: skip


def cli_flags(tmp_path: Path, shared_data: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--dataset", "mnist", "--data-root", str(shared_data), "--model", "mlp", "--optimizer", "sgd",
        "--lr", "0.05", "--steps", str(steps), "--batch-size", "32", "--train-samples", "256",
        "--test-samples", "64", "--checkpoint-every", "4", "--threads", "1", "--tensorboard", "off",
        "--progress", "off", "--quiet", "--out", str(tmp_path / "run"), *extra,
    ]  # fmt: skip


def test_the_command_line_reports_a_corrupt_checkpoint_in_one_line_with_exit_2(tmp_path, shared_data, capsys):
    assert command(cli_flags(tmp_path, shared_data, 8)) == 0
    newest = tmp_path / "run" / "checkpoints" / "step-00000008.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert command(cli_flags(tmp_path, shared_data, 12, "--resume", str(newest))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distlearn train: error: checkpoint {newest} fails"), (
        lines
    )
    assert "--resume " + str(tmp_path / "run" / "checkpoints" / "step-00000004.pt") in lines[0]


def _full_disk_on_file_writes(monkeypatch):
    real_save = torch.save

    def save(obj, target, *args, **kwargs):
        if hasattr(target, "fileno"):  # the file on disk, not the in-memory payload
            target.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)


def test_a_full_disk_leaves_no_temporary_file_and_keeps_the_previous_checkpoints(written, monkeypatch):
    _, directory, _ = written
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    _full_disk_on_file_writes(monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint({"model": {"w": torch.ones(10)}}, directory, 16)
    message = str(caught.value)
    assert f"the disk holding {directory} is full (No space left on device)" in message
    assert f"the last good checkpoint {directory / 'step-00000012.pt'} is untouched" in message
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no temporary file, nothing lost


def test_the_trainer_reports_a_full_disk_in_one_line_with_exit_2(tmp_path, shared_data, monkeypatch, capsys):
    _full_disk_on_file_writes(monkeypatch)
    status = command(cli_flags(tmp_path, shared_data, 8))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1 and "is full (No space left on device)" in lines[0], lines
    assert lines[0].startswith("distlearn train: error: could not write checkpoint ")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.mark.timeout(120)
def test_a_real_file_size_limit_fails_the_write_cleanly(tmp_path):
    """A real write cut short by the kernel (RLIMIT_FSIZE, EFBIG), in a process of its own."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from pathlib import Path
        from distlearn.checkpoint import load_checkpoint, save_checkpoint
        from distlearn.errors import CheckpointError
        directory = Path({str(tmp_path / "checkpoints")!r})
        save_checkpoint({{"w": torch.ones(10)}}, directory, 1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            save_checkpoint({{"w": torch.ones(1_000_000)}}, directory, 2)
        except CheckpointError as error:
            print("CheckpointError:", error)
        print("files:", sorted(p.name for p in directory.iterdir()))
        print("step 1 loads:", load_checkpoint(directory / "step-00000001.pt")["w"].tolist())
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "CheckpointError: could not write checkpoint" in out and "exceeds the size limit" in out, out
    assert "files: ['step-00000001.pt']" in out  # no temporary file left, the previous checkpoint kept
    assert "step 1 loads: [1.0, 1.0" in out


def test_rl_checkpoints_carry_the_checksum(tmp_path):
    shared = {"algorithm": "sync-pg", "model": {"w": torch.ones(4)}}
    path = save_rl_checkpoint(tmp_path, 3, shared, {"env": 1}, rank=0, world_size=1,
                              config_values={"algorithm": "sync-pg"})  # fmt: skip
    assert torch.load(path, weights_only=True)["format"] == ENVELOPE
    assert read_verified(path)["ranks"] == [{"env": 1}]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)
