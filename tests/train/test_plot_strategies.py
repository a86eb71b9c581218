"""``distlearn plot`` draws every strategy's run: its directory holds ``metrics.jsonl`` whoever writes it;
and the parameter server's run shows the main worker's staleness as the server recorded it.

The command line runs in this process (``distlearn.cli.main``, as ``python -m distlearn`` calls it); the
job's own processes (torchrun's agent and workers, the parameter server's ranks, Hogwild!'s pool) start
from here as they would from the command, so only the command's own interpreter is saved. The ps run is
made once for both of its tests (module fixture ``ps_run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from distlearn.cli import main
from distlearn.metrics import read_run
from distlearn.plot_cli import plot_runs

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8  # every run's; the main worker of the ps run pushes once a step
FLAGS = [
    "--dataset", "mnist", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.05", "--steps", str(STEPS),
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


@contextlib.contextmanager
def _output_into(path: Path):
    """This process's stdout and stderr, and those of the processes it starts (file descriptors 1 and 2),
    written to ``path`` (a module fixture has no capfd)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@pytest.fixture(scope="module")
def ps_run(tmp_path_factory) -> tuple[int, Path, str]:
    """``distlearn train --strategy ps --workers 3``, not quiet (its summary table):
    (exit status, its --out, the output of it and its processes)."""
    data = ROOT.parent / "shared" / "data"  # as tests/conftest.py's shared_data (a fixture per test)
    if not data.is_dir():
        pytest.skip(f"shared data directory {data} is not present on this machine")
    where = tmp_path_factory.mktemp("ps-run")
    out = where / "ps"
    flags = [flag for flag in FLAGS if flag != "--quiet"]
    flags += ["--data-root", str(data), "--strategy", "ps", *STRATEGIES["ps"]]
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + path if path else "")  # the ranks'
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # the summary table's rows on one line each
    try:
        with _output_into(where / "output.txt"):
            code = main(["train", *flags, "--out", str(out)])
    finally:
        for name, value in (("PYTHONPATH", path), ("COLUMNS", columns)):
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    return code, out, (where / "output.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_plot_draws_a_run_of_every_strategy(tmp_path, shared_data, strategy, cli, request):
    pytest.importorskip("matplotlib")
    if strategy == "ps":
        code, out, errors = request.getfixturevalue("ps_run")
    else:
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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_ps_summary_shows_the_main_workers_staleness_as_the_server_recorded_it(ps_run):
    code, out, output = ps_run
    assert code == 0, output[-3000:]
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["extra"]
    server = json.loads((out / "ps-server0.json").read_text())
    mine = [staleness for _, worker, staleness in server["updates"] if worker == 1]  # rank 1: the main worker
    assert summary["staleness_pushes"] == len(mine) == STEPS and summary["pushes_dropped"] == 0
    assert summary["staleness_mean"] == pytest.approx(sum(mine) / len(mine))
    assert summary["staleness_max"] == max(mine)
    row = f"mean {summary['staleness_mean']:.2f}, max {summary['staleness_max']} versions"
    assert f"{row} (this worker's {STEPS} pushes)" in output, output
