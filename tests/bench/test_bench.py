"""``distlearn bench`` end to end on a tiny budget: every number in the table comes from the raw JSON."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from distlearn.bench.harness import available, collect
from distlearn.bench.report import markdown, table_rows
from distlearn.bench.suites import SUITES, Entry
from distlearn.cli import main


@pytest.fixture
def cli(capsys):
    """``cli(*argv)``: ``distlearn ARGV`` in this process, as ``python -m distlearn`` runs it (the runs of a
    suite still start as processes of their own); its exit status, stdout and stderr."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[int, str, Path, Path]:
    """Three rows of the quick suite, run once per module by ``distlearn bench`` in this process: its exit
    status, its output (stdout and stderr), the results and the runs directories. The resume test starts
    from a copy of these runs instead of training its own first row."""
    tmp_path = tmp_path_factory.mktemp("quick")
    out, runs = tmp_path / "results", tmp_path / "runs"
    command = [
        "bench",
        "--suite",
        "quick",
        "--only",
        "single,backend allreduce,hogwild",
        "--out",
        str(out),
        "--runs",
        str(runs),
        "--progress",
        "off",
    ]
    # the quick suite is small by design (12,000 samples, one epoch); --only keeps three of its rows
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            code = main(command)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, output.getvalue(), out, runs


@pytest.mark.timeout(600)
def test_quick_suite_on_a_tiny_budget_writes_a_table_made_from_the_json(quick_run):
    code, output, out, _ = quick_run
    assert code == 0, output
    (result_file,) = out.glob("bench-quick-*.json")
    record = json.loads(result_file.read_text())
    for key in ("machine", "cores", "torch", "git_commit", "command"):
        assert key in record["environment"]
    results = {r["label"]: r for r in record["results"]}
    assert results["single process"]["status"] == "ok"
    assert results["sync, backend allreduce, R=2"]["status"] == "ok"
    hogwild = results["hogwild, R=2"]  # present whether or not it can run here, with the reason if not
    assert hogwild["status"] == "ok" or hogwild["reason"]

    table = (out / result_file.with_suffix(".md").name).read_text()
    assert table == markdown(SUITES["quick"], record["results"], record["environment"])
    for row in table_rows(record["results"], record["global_batch"]):
        if row["status"] != "ok":
            continue
        line = next(cells(line) for line in table.splitlines() if cells(line)[0] == row["label"])
        assert line[1] == f"{100 * row['final_accuracy']:.2f}%"
        assert line[3] == f"{row['samples_per_s']:,.0f}"
        assert int(line[6]) == row["updates"]
        # and the JSON itself agrees with the run's metrics files
        raw = results[row["label"]]
        again = collect(raw["out"], record["target"])
        assert again["final_accuracy"] == raw["final_accuracy"] and again["updates"] == raw["updates"]
    sync = results["sync, backend allreduce, R=2"]
    single = results["single process"]
    assert sync["bytes_sent"] > 0 and single["bytes_sent"] == 0
    assert (
        abs(sync["final_accuracy"] - single["final_accuracy"]) < 0.02
    )  # same trajectory, fixed global batch
    assert (out / result_file.with_suffix(".png").name).is_file()
    assert re.search(r"Projection \(not a measurement", table)


def cells(line: str) -> list[str]:
    """The stripped cells of one Markdown table row (rich pads them to the column's width)."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_unavailable_entries_say_why():
    assert "not in this installation" in available(Entry("x", "no-such-strategy"))
    assert available(Entry("single", "single")) is None
    assert "no --frobnicate flag" in available(Entry("x", "single", 1, ("--frobnicate", "1")))


def test_compare_shows_two_result_files(tmp_path, cli):
    suite = replace(SUITES["quick"], name="fake")
    fake = {
        "label": "single process",
        "strategy": "single",
        "workers": 1,
        "status": "ok",
        "final_accuracy": 0.5,
        "time_to_target_s": None,
        "samples_per_s": 100.0,
        "updates": 10,
        "bytes_sent": 0,
        "mean_staleness": None,
        "train_seconds": 1.0,
        "train_examples": 1280,
        "curve": [],
    }
    env = {"git_commit": "abc", "cores": 2, "torch": "x"}
    for name, speed in (("a", 100.0), ("b", 150.0)):
        record = {
            "suite": suite.name,
            "global_batch": 128,
            "environment": env,
            "results": [{**fake, "samples_per_s": speed}],
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    code, stdout, _ = cli("bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert code == 0
    assert ["single process", "50.00", "50.00", "100", "150", "1.50"] in map(cells, stdout.splitlines())


@pytest.mark.timeout(600)
def test_resume_reads_back_finished_runs_and_runs_the_rest(tmp_path, cli, quick_run):
    code, output, _, quick_runs = quick_run
    assert code == 0, output
    (finished,) = quick_runs.iterdir()  # quick-<stamp>: single, sync backend R=2 and hogwild finished
    out, runs = tmp_path / "results", tmp_path / "runs"
    runs_dir = runs / finished.name
    shutil.copytree(finished, runs_dir)  # the copy is changed here; the quick test reads the original
    single_metrics = runs_dir / "single-process" / "metrics.jsonl"
    before = single_metrics.stat().st_mtime_ns
    # a run stopped before its summary is run again
    sync_metrics = runs_dir / "sync-backend-allreduce-r-2" / "metrics.jsonl"
    lines = sync_metrics.read_text().splitlines()
    assert any('"kind": "summary"' in x for x in lines)
    sync_metrics.write_text("\n".join(x for x in lines if '"kind": "summary"' not in x) + "\n")
    assert not (runs_dir / "torch-ddp-r-2").exists()

    # a stopped invocation had finished "single process", was stopped in the sync row, had not started DDP
    code, stdout, stderr = cli(
        "bench", "--suite", "quick", "--progress", "off", "--only", "single,backend allreduce,torch DDP",
        "--out", str(out), "--runs", str(runs), "--resume", str(runs_dir),
    )  # fmt: skip
    assert code == 0, stdout + stderr
    record = json.loads((out / f"bench-{runs_dir.name}.json").read_text())  # the same time stamp
    results = {r["label"]: r for r in record["results"]}
    assert results["single process"]["resumed"] is True and results["single process"]["status"] == "ok"
    assert single_metrics.stat().st_mtime_ns == before  # read back, not run again
    assert (
        results["single process"]["final_accuracy"]
        == collect(runs_dir / "single-process", 0.8)["final_accuracy"]
    )
    for label in ("torch DDP, R=2", "sync, backend allreduce, R=2"):
        assert results[label]["status"] == "ok" and not results[label].get("resumed"), label
    assert '"kind": "summary"' in sync_metrics.read_text()
    assert '"kind": "summary"' in (runs_dir / "torch-ddp-r-2" / "metrics.jsonl").read_text()
    table = (out / f"bench-{runs_dir.name}.md").read_text()
    assert "1 of 3 rows were read back" in table


def test_resume_refuses_a_directory_of_another_suite(tmp_path, cli):
    other = tmp_path / "mnist-20261201-000000"
    other.mkdir()
    code, _, stderr = cli("bench", "--suite", "quick", "--resume", str(other))
    assert code != 0 and "not a runs directory of the quick suite" in stderr


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children, grandchildren, ...), from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # it ended while we looked
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if os.path.exists(f"/proc/{pid}")}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
@pytest.mark.timeout(180)
def test_a_stopped_bench_stops_the_run_in_progress_too(tmp_path):
    """Each run is a launcher in a session of its own whose torchrun workers are in another session below it:
    SIGTERM to the bench must end every one of those processes, not orphan them."""
    command = [sys.executable, "-m", "distlearn", "bench", "--suite", "quick", "--only", "torch DDP"]
    command += ["--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--progress", "off"]
    bench = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while len(below) < 4 and time.monotonic() < deadline:  # launcher, torchrun, 2 workers
            below = _descendants(bench.pid)
            time.sleep(0.2)
        assert len(below) >= 4, f"the run's workers did not start within 90 s: {below}"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while _alive(below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(below), f"processes of the stopped run still alive: {_alive(below)}"
    finally:
        for pid in _alive(below | {bench.pid}):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        bench.wait()


@pytest.mark.parametrize("suite_name", sorted(SUITES))
def test_every_entry_of_every_suite_is_a_valid_train_command(suite_name, tmp_path):
    """A row that cannot start fails only after the rows before it have run (the cifar10 suite's DNI rows
    once asked DNI for the suite's Nesterov): check each entry's arguments as distlearn train would."""
    from distlearn.bench.harness import train_arguments
    from distlearn.parallel.dni import dni_config_of
    from distlearn.train import validate_config
    from distlearn.train_cli import parse_config

    suite = SUITES[suite_name]
    for entry in suite.entries:
        if available(entry) is not None:
            continue
        config = parse_config(train_arguments(suite, entry, tmp_path / "run"))
        validate_config(config)
        if config.strategy == "dni":
            dni_config_of(config)
