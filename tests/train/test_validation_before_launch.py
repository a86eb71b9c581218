"""Bad input is refused by ``distlearn train`` before any worker starts: one message, exit status 2.

Each case runs the real command line in this process (``distlearn.cli.main``, as ``python -m distlearn``
calls it: a refusal before any worker needs no process of its own) and checks the exit status, that
stderr holds one line naming the problem and no traceback, and that no worker was started: the launcher
writes ``OUT/launch.toml`` and prints "starting N worker(s)" just before it starts torchrun, so neither
may appear. The ranks' options are compared when the strategy joins the job: two ranks started by hand with
different options both end with the message naming the fields (no gloo abort, no hang).
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distlearn.config import check_type
from distlearn.data import check_dataset
from distlearn.data.idx import read_idx, read_idx_shape, write_idx
from distlearn.errors import ConfigError, DataError
from distlearn.parallel.agree import PER_RANK_FIELDS, agreed_values
from distlearn.parallel.base import check_global_batch
from distlearn.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from ranks import run_ranks  # noqa: E402

QUICK = ["--model", "mlp", "--steps", "2", "--train-samples", "256", "--test-samples", "64",
         "--batch-size", "64", "--progress", "off", "--tensorboard", "off"]  # fmt: skip


@pytest.fixture
def refused(tmp_path, cli):
    """``refused(*flags, out=None)``: run ``distlearn train QUICK FLAGS --out ...`` and assert the refusal;
    its one-line message and seconds."""

    def run(*flags: str, out: str | None = None) -> tuple[str, float]:
        out = out or str(tmp_path / "run")
        started = time.monotonic()
        done = cli("train", *QUICK, *flags, "--out", out)
        seconds = time.monotonic() - started
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and "starting" not in done.stdout, (done.stdout, done.stderr)
        assert not (Path(out) / "launch.toml").exists() and not (Path(out) / "metrics.jsonl").exists()
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("distlearn train: error: "), done.stderr
        return lines[0], seconds

    return run


@pytest.mark.timeout(150)
def test_an_unknown_reducer_in_a_config_file_names_the_known_ones(tmp_path, refused):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "sync"\nworkers = 2\n[sync]\nreducer = "foo"\n')
    message, _ = refused("--config", str(path))
    assert "unknown reducer 'foo'" in message and "ring, tree" in message


@pytest.mark.timeout(150)
def test_an_unknown_reducer_flag_exits_2_before_any_worker(tmp_path, cli):
    done = cli("train", *QUICK, "--strategy", "sync", "--workers", "2", "--reducer", "foo",
               "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr and "starting" not in done.stdout
    assert "unknown reducer 'foo'" in done.stderr and "ring, tree" in done.stderr  # tyro's message box
    assert not (tmp_path / "run" / "launch.toml").exists()


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--strategy", "ps", "--workers", "1"], "needs at least one worker besides the servers"),
        (["--strategy", "ps", "--servers", "3", "--workers", "3"], "use --workers 4 or more"),
        (["--strategy", "sync", "--workers", "3", "--batch-size", "100"], "use --batch-size 99 or 102"),
        (["--strategy", "ps", "--workers", "3", "--softsync", "5"], "--softsync 5 exceeds the 2 worker"),
        (["--strategy", "ps", "--workers", "3", "--backup-workers", "2"], "--backup-workers 2 leaves no"),
        (["--strategy", "easgd", "--easgd-mode", "async", "--workers", "1"], "needs a centre rank"),
    ],
)
def test_the_job_size_is_checked_before_launch(tmp_path, refused, flags, expected):
    message, _ = refused(*flags)
    assert expected in message


@pytest.mark.timeout(150)
def test_softsync_under_another_strategy_names_its_strategy(tmp_path, refused):
    message, _ = refused("--strategy", "sync", "--workers", "2", "--softsync", "5")
    assert "--softsync is an option of --strategy ps" in message


@pytest.mark.timeout(150)
@pytest.mark.parametrize("text", ['lr = "abc"\n', 'strategy = "sync"\nworkers = 2\n[sync]\nbucket_mb = "x"'])
def test_a_config_value_of_the_wrong_type_names_key_value_and_type(tmp_path, refused, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    message, _ = refused("--config", str(path))
    key, value = ("lr", "'abc'") if "lr" in text else ("bucket_mb", "'x'")
    assert f"{path}" in message and f"{key} = {value} is a string; expected a number" in message


@pytest.mark.timeout(150)
def test_a_yaml_config_value_of_the_wrong_type_is_named(tmp_path, refused):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("lr: abc\n")
    message, _ = refused("--config", str(path))
    assert "lr = 'abc' is a string; expected a number" in message


@pytest.mark.timeout(150)
@pytest.mark.parametrize("out", ["/proc/distlearn-run", "FILE"])
def test_an_out_that_cannot_be_written_is_named_with_the_reason(tmp_path, refused, out):
    if out == "FILE":
        out = str(tmp_path / "a-file")
        Path(out).write_text("")
    message, _ = refused("--strategy", "sync", "--workers", "2", out=out)
    assert f"--out {out}" in message
    assert ("is not writable (cannot create a directory in /proc" in message) or "is a file" in message


def _mnist(directory: Path, images: np.ndarray | bytes, n: int = 100) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(images, bytes):
        (directory / "t10k-images-idx3-ubyte").write_bytes(images)
    else:
        write_idx(directory / "t10k-images-idx3-ubyte.gz", images)
    write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(n, dtype=np.uint8))
    return directory


OVERFLOW = struct.pack(">4I", 2051, 2**31, 2**31, 4)  # 2^31 * 2^31 * 4 = 2^64 bytes: wraps to 0 in int64


@pytest.mark.timeout(150)
def test_an_idx_header_that_overflows_is_a_data_error_before_launch(tmp_path, refused):
    data = _mnist(tmp_path / "data", OVERFLOW)
    message, _ = refused("--dataset", "mnist", "--data-root", str(data), "--strategy", "sync",
                         "--workers", "2")  # fmt: skip
    assert str(data / "t10k-images-idx3-ubyte") in message and "damaged header" in message


@pytest.mark.timeout(150)
def test_images_that_are_not_28x28_are_a_data_error_before_launch(tmp_path, refused):
    data = _mnist(tmp_path / "data", np.zeros((100, 10, 10), dtype=np.uint8))
    message, _ = refused("--dataset", "mnist", "--data-root", str(data), "--strategy", "sync",
                         "--workers", "2")  # fmt: skip
    assert str(data / "t10k-images-idx3-ubyte.gz") in message
    assert "10x10 pixels (shape (100, 10, 10))" in message


# -- the checks themselves, in process ---------------------------------------------------------------------


def test_idx_headers_that_overflow_or_disagree_with_the_size(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(OVERFLOW)
    for read in (read_idx, read_idx_shape):
        with pytest.raises(DataError, match=rf"{path} has a damaged header: its dimensions \(2147483648"):
            read(path, dimensions=3)
    path.write_bytes(struct.pack(">4I", 2051, 5, 28, 28) + bytes(28 * 28 * 4))  # one image short
    for read in (read_idx, read_idx_shape):
        with pytest.raises(DataError, match=r"images is truncated: its header announces \(5, 28, 28\)"):
            read(path, dimensions=3)
    write_idx(tmp_path / "ok.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    assert read_idx_shape(tmp_path / "ok.gz", dimensions=3) == (3, 28, 28)


def test_check_dataset_reads_headers_only_and_names_the_file(tmp_path):
    good = _mnist(tmp_path / "good", np.zeros((100, 28, 28), dtype=np.uint8))
    check_dataset("mnist", good)
    small = _mnist(tmp_path / "small", np.zeros((100, 28, 27), dtype=np.uint8))
    with pytest.raises(DataError, match=r"small/t10k-images-idx3-ubyte.gz holds images of 28x27 pixels"):
        check_dataset("mnist", small)
    counts = _mnist(tmp_path / "counts", np.zeros((99, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"holds 99 images but .* 100 labels"):
        check_dataset("mnist", counts)
    with pytest.raises(DataError, match=r"no mnist data in"):
        check_dataset("mnist", tmp_path / "nothing")


def test_check_type_names_key_value_and_expected_type():
    check_type("lr", 1, float | None)  # an int is a valid float
    check_type("steps", None, int | None)
    check_type("optimizer_option", ["momentum=0.9"], tuple[str, ...])
    for key, value, tp, expected in [
        ("lr", "abc", float | None, "lr = 'abc' is a string; expected a number (or leave the key out)"),
        ("epochs", 2.5, int, "epochs = 2.5 is a number; expected an integer"),
        ("quiet", "yes", bool, "quiet = 'yes' is a string; expected true or false"),
        ("workers", True, int, "workers = True is a boolean; expected an integer"),
        ("option", [1], tuple[str, ...], "option = [1] is a list; expected a list of strings"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_type(key, value, tp, "f.toml")
    with pytest.raises(ConfigError, match=r"--lr must be a number, got 'abc' \(str\)"):
        TrainConfig(lr="abc")


def test_the_global_batch_names_the_nearest_valid_sizes():
    check_global_batch(99, 3)
    with pytest.raises(ConfigError, match=r"--batch-size 100 is not divisible by the 3 replicas.*99 or 102"):
        check_global_batch(100, 3)
    with pytest.raises(ConfigError, match=r"use --batch-size 4$"):
        check_global_batch(2, 4)


def test_the_compared_options_leave_out_the_per_rank_ones():
    config = TrainConfig.build(strategy="sync", reducer="ring", out="/a", data_root="/b", threads=2)
    values = agreed_values(config, config.options)
    assert values["reducer"] == "'ring'" and values["bucket_mb"] == "25.0" and values["seed"] == "0"
    assert not PER_RANK_FIELDS & set(values) and "options" not in values
    other = TrainConfig.build(strategy="sync", reducer="ring", out="/c", data_root="/d", threads=4)
    assert agreed_values(other, other.options) == values


# -- ranks started with different options ------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_ranks_started_with_different_options_both_name_the_difference(tmp_path):
    # two ranks started by hand (as torchrun on two nodes would): rank 1 with another --bucket-mb
    flags = [*QUICK, "--strategy", "sync", "--dataset", "fashion-mnist", "--comm-timeout", "60",
             "--out", str(tmp_path / "run")]  # fmt: skip
    code = (
        "import os, sys; from distlearn.train_cli import command; "
        f"flags = {flags!r} + (['--bucket-mb', '2'] if os.environ['RANK'] == '1' else []); "
        "sys.exit(command(flags))"
    )
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env_path if env_path else "")
    try:
        codes = run_ranks([sys.executable, "-c", code], 2, tmp_path / "logs", timeout=180)
    finally:
        if env_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_path
    logs = [(tmp_path / "logs" / f"log{rank}.txt").read_text() for rank in range(2)]
    assert codes == [2, 2], logs
    for log in logs:
        assert "started with different options (--bucket-mb: rank 0 25.0, rank 1 2.0)" in log, log
        assert "Traceback" not in log
