"""``distlearn plot`` draws every strategy's run: its directory holds ``metrics.jsonl`` whoever writes it.

The command line runs in this process (``distlearn.cli.main``, as ``python -m distlearn`` calls it); the
job's own processes (torchrun's agent and workers, the parameter server's ranks, Hogwild!'s pool) start
from here as they would from the command, so only the command's own interpreter is saved.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distlearn.cli import main
from distlearn.metrics import read_run
from distlearn.plot_cli import plot_runs

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "--dataset", "mnist", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.05", "--steps", "8",
    "--batch-size", "32", "--train-samples", "256", "--test-samples", "64", "--log-every", "2",
    "--progress", "off", "--tensorboard", "off", "--threads", "1", "--quiet",
]  # fmt: skip
STRATEGIES = {
    "sync": ["--workers", "2"],
    "ps": ["--workers", "3"],  # rank 0 serves; the first worker, rank 1, does the job's I/O
    "local-sgd": ["--workers", "2"],
    "easgd": ["--workers", "2"],
    "hogwild": ["--workers", "2"],
    "dni": ["--stages", "2", "--optimizer", "adam", "--no-checkpoints"],  # rank 0 evaluates, rank 1 trains
}


@pytest.fixture
def cli(capfd, monkeypatch):
    """``cli(*argv)``: ``distlearn ARGV`` in this process; (exit status, stderr of it and its processes)."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src") + (os.pathsep + path if path else ""))  # the workers'

    def run(*argv: str) -> tuple[int, str]:
        capfd.readouterr()
        code = main(list(argv))
        return code, capfd.readouterr().err

    return run


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_plot_draws_a_run_of_every_strategy(tmp_path, shared_data, strategy, cli):
    pytest.importorskip("matplotlib")
    out = tmp_path / strategy
    flags = [*FLAGS, "--data-root", str(shared_data), "--strategy", strategy, *STRATEGIES[strategy]]
    code, errors = cli("train", *flags, "--out", str(out))
    assert code == 0, errors[-3000:]
    assert (out / "metrics.jsonl").is_file()
    records = read_run(out)
    assert [r.step for r in records if r.kind == "train"] == [2, 4, 6, 8]
    assert [r.step for r in records if r.kind == "eval"] == [8]
    png = plot_runs([out], tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if strategy == "ps":  # and through the command line, which failed with "no metrics file" before
        code, errors = cli("plot", str(out), "--out", str(tmp_path / "cli.png"))
        assert code == 0 and (tmp_path / "cli.png").is_file(), errors[-3000:]
