"""What a run leaves in --out: one curve after a resume, no earlier run mixed in, progress lines in a log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_resume import Crash, CrashAfter, config

from distlearn.errors import ConfigError
from distlearn.metrics import MetricRecord, cut_metrics, read_metrics, read_run
from distlearn.parallel import SingleProcess
from distlearn.train import train
from distlearn.train_cli import command


def steps(records: list[MetricRecord], kind: str) -> list[int]:
    return [r.step for r in records if r.kind == kind]


@pytest.mark.parametrize("crash_at,checkpoint_every", [(8, 5), (16, 6), (23, 5)])
def test_resumed_metrics_are_the_uninterrupted_runs(tmp_path, synthetic, crash_at, checkpoint_every):
    # log_every=3 and checkpoints every 5 steps: train windows straddle the checkpoints
    train_set, test_set = synthetic
    full = train(config(tmp_path / "full", epochs=2, checkpoint_every=checkpoint_every), train_data=train_set,
                 test_data=test_set)  # fmt: skip
    interrupted = config(tmp_path / "crash", epochs=2, checkpoint_every=checkpoint_every)
    with pytest.raises(Crash):
        train(interrupted, strategy=CrashAfter(crash_at), train_data=train_set, test_data=test_set)
    killed = read_metrics(tmp_path / "crash" / "run")
    newest = max(p.name for p in (tmp_path / "crash" / "run" / "checkpoints").glob("step-*.pt"))
    assert max(r.step for r in killed) > int(newest[5:13])  # records past the checkpoint, to be dropped
    train(replace(interrupted, resume=str(tmp_path / "crash" / "run" / "checkpoints")), train_data=train_set,
          test_data=test_set)  # fmt: skip

    expected, got = read_metrics(full.metrics_path), read_metrics(tmp_path / "crash" / "run")
    for kind in ("train", "eval"):
        assert steps(got, kind) == steps(expected, kind), kind
        assert steps(got, kind) == sorted(set(steps(got, kind)))  # strictly increasing
    assert [r.kind for r in got].count("summary") == 1 and got[-1].kind == "summary"
    # the window that straddled the checkpoint was saved with it: the same examples, the same mean loss
    assert [r.loss for r in got if r.kind != "summary"] == [r.loss for r in expected if r.kind != "summary"]
    assert [r.accuracy for r in got if r.kind == "train"] == [
        r.accuracy for r in expected if r.kind == "train"
    ]


class CrashInEvaluation(SingleProcess):
    """The process 'dies' in its first evaluation (the end of epoch 1, after a checkpoint-every step)."""

    def evaluation_model(self, model):
        raise Crash("simulated crash while evaluating")


def test_a_crash_in_the_end_of_epoch_evaluation_loses_no_eval_record(tmp_path, synthetic):
    # 12 steps per epoch and --checkpoint-every 6: step 12 is a checkpoint step and the epoch's end. The
    # epoch's checkpoint comes after its evaluation, so a crash in it resumes from step 6 and evaluates 12.
    train_set, test_set = synthetic
    interrupted = config(tmp_path, epochs=2, checkpoint_every=6)
    with pytest.raises(Crash):
        train(interrupted, strategy=CrashInEvaluation(), train_data=train_set, test_data=test_set)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == ["step-00000006.pt"]
    train(replace(interrupted, resume=str(tmp_path / "run" / "checkpoints")), train_data=train_set,
          test_data=test_set)  # fmt: skip
    assert steps(read_metrics(tmp_path / "run"), "eval") == [12, 24]


def test_cut_metrics_keeps_the_records_up_to_the_step_and_no_summary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [MetricRecord(kind="train", step=s, epoch=0.0, wall_time=0.0).to_json() for s in (3, 6, 9)]
    lines.append(MetricRecord(kind="summary", step=6, epoch=0.0, wall_time=0.0).to_json())
    path.write_text("\n".join(lines) + '\n{"kind": "tra')  # the killed run's last line, cut short
    assert cut_metrics(path, 6) == 3
    assert [(r.kind, r.step) for r in read_metrics(path)] == [("train", 3), ("train", 6)]
    assert not list(tmp_path.glob("*.tmp"))


def test_an_out_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, synthetic):
    train_set, test_set = synthetic
    first = config(tmp_path, epochs=1)
    train(first, train_data=train_set, test_data=test_set)
    with pytest.raises(ConfigError, match="holds an earlier run") as caught:
        train(first, train_data=train_set, test_data=test_set)
    assert "--resume" in str(caught.value) and "--overwrite" in str(caught.value)
    with pytest.raises(ConfigError, match="only one"):
        train(replace(first, overwrite=True, resume=str(tmp_path / "run" / "checkpoints")))

    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")  # not distlearn's: --overwrite keeps it
    (run / "checkpoints" / "step-00000099.pt").write_bytes(b"an earlier, longer run")
    result = train(replace(first, overwrite=True, keep_checkpoints=5), train_data=train_set,
                   test_data=test_set)  # fmt: skip
    assert (run / "notes.txt").read_text() == "mine"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000005.pt", "step-00000010.pt", "step-00000012.pt"]  # step 99 went
    records = read_metrics(result.metrics_path)
    assert [r.kind for r in records].count("summary") == 1 and steps(records, "eval") == [12]


def test_the_command_line_refuses_an_out_holding_a_run_with_exit_status_2(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-00000010.pt").write_bytes(b"")
    assert command(["--strategy", "sync", "--workers", "2", "--out", str(out)]) == 2  # before any worker
    error = capsys.readouterr().err
    assert "holds an earlier run (checkpoints/step-00000010.pt)" in error
    assert "--resume" in error and "--overwrite" in error
    assert not (out / "launch.toml").exists()


ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "--dataset", "mnist", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.05", "--epochs", "8",
    "--batch-size", "32", "--train-samples", "512", "--test-samples", "64", "--log-every", "4",
    "--tensorboard", "off", "--threads", "1", "--no-checkpoints",
]  # fmt: skip
LINE = re.compile(
    r"train step (\d+)/128 \(\d+%\)(  loss \d+\.\d{4})?(  test acc \d\.\d{4})?  [\d,]+ samples/s  "
    r"ETA (\d+:\d\d:\d\d|-)"
)


def _start(out: Path, data: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "distlearn.cli", "train", *FLAGS, *flags, "--out", str(out)]
    command += ["--data-root", str(data)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), COLUMNS="120")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.timeout(120)
def test_progress_lines_appear_while_training_when_stdout_is_a_pipe(tmp_path, shared_data):
    process = _start(tmp_path / "run", shared_data, "--progress-every", "0")
    try:
        first = process.stdout.readline()
        running = process.poll() is None  # the line came while it trained, not at its end
        rest, errors = process.communicate(timeout=100)
    finally:
        process.kill()
    assert process.returncode == 0, errors[-2000:]
    assert running and LINE.fullmatch(first.rstrip("\n")), first
    lines = [first.rstrip("\n")] + [line for line in rest.splitlines() if line.startswith("train step")]
    assert all(LINE.fullmatch(line) for line in lines), lines
    done = [int(LINE.fullmatch(line).group(1)) for line in lines]
    assert done == sorted(done) and done[-1] == 128 and len(done) > 3
    assert "distlearn train: summary" in rest  # the table follows the lines


@pytest.mark.timeout(120)
def test_quiet_prints_only_the_summary(tmp_path, shared_data, capsys, monkeypatch):
    # in this process: captured, stdout is no terminal here either; as wide as _start's
    monkeypatch.setenv("COLUMNS", "120")
    argv = [*FLAGS, "--progress-every", "0", "--quiet", "--out", str(tmp_path / "run")]
    status = command([*argv, "--data-root", str(shared_data)])
    output, errors = capsys.readouterr()
    assert status == 0, errors[-2000:]
    assert "train step" not in output and "distlearn train: summary" in output
    assert "test accuracy" in output and "samples/s" in output


def test_progress_line_format_and_eta():
    from distlearn.train.report import Progress

    progress = Progress(False, 3600.0, total=100, done=20, replicas=2)
    progress.started -= 8.0  # 8 s for this run's 40 steps: 0.2 s a step, 40 steps left
    progress._last_time -= 8.0
    progress.update(60, "loss 0.5000", samples=40 * 16)
    progress.update(60, "test acc 0.7500")
    line = progress.line()
    assert line.startswith("train step 60/100 (60%)  loss 0.5000  test acc 0.7500  ")
    assert line.endswith("ETA 0:00:08")
    rate = float(re.search(r"([\d,]+) samples/s", line).group(1).replace(",", ""))
    assert rate == pytest.approx(40 * 16 * 2 / 8.0, rel=0.05)  # both replicas' samples


def test_a_run_dir_without_metrics_jsonl_reads_its_lowest_rank(tmp_path):
    # a parameter-server run written before its first worker named its file metrics.jsonl
    for rank, loss in ((2, 2.0), (1, 1.0)):
        record = MetricRecord(kind="train", step=4, epoch=0.0, wall_time=0.0, loss=loss, rank=rank)
        (tmp_path / f"metrics.rank{rank}.jsonl").write_text(record.to_json() + "\n")
    assert [r.loss for r in read_run(tmp_path)] == [1.0]
    with pytest.raises(Exception, match="no metrics file"):
        read_run(tmp_path / "missing")


def test_a_run_stopped_by_steps_and_extended_has_one_curve_and_one_summary(tmp_path, synthetic):
    train_set, test_set = synthetic
    constant = {"schedule": "constant", "warmup_steps": 0}  # the lr does not depend on the total steps
    full = train(config(tmp_path / "full", epochs=2, **constant), train_data=train_set, test_data=test_set)
    short = config(tmp_path / "short", epochs=2, steps=10, **constant)
    train(short, train_data=train_set, test_data=test_set)  # stops at step 10 (mid-epoch), evaluates there
    train(replace(short, steps=None, resume=str(tmp_path / "short" / "run" / "checkpoints")),
          train_data=train_set, test_data=test_set)  # fmt: skip
    expected, got = read_metrics(full.metrics_path), read_metrics(tmp_path / "short" / "run")
    assert steps(got, "train") == steps(expected, "train")
    assert [r.loss for r in got if r.kind == "train"] == [r.loss for r in expected if r.kind == "train"]
    assert steps(got, "eval") == [10, 12, 24]  # the stop's own evaluation stays, once
    assert [r.kind for r in got].count("summary") == 1 and got[-1].kind == "summary"
