"""Stragglers (--straggler, --straggler-dist) and the simulated clock (distlearn.train.straggler).

Checked: the options' parsing and their refusal before launch (one line, exit 2); the drawn delays repeat
for one (seed, rank, step) and follow their distribution (sample mean and median against the closed forms);
a real 2-process job sleeps the delay on the straggler only (its wall time grows by about the delays, its
CPU time does not) and the clock adds up: an asynchronous rank's clock is its CPU time plus its delays, a
synchronous step lasts as long as the slower replica, so both ranks end on one clock bounded by the sums.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from distlearn.errors import ConfigError
from distlearn.train import TrainConfig, validate_config
from distlearn.train.straggler import (
    check_stragglers,
    draw_delay_ms,
    parse_distribution,
    parse_stragglers,
    step_delay_ms,
)

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--model", "mlp", "--train-samples", "512", "--test-samples", "128", "--batch-size", "64",
         "--progress", "off", "--tensorboard", "off", "--no-checkpoints", "--threads", "1"]  # fmt: skip


def run_train(tmp_path: Path, *flags: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distlearn.cli", "train", *QUICK, *flags, "--out", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), COLUMNS="200")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def summaries(run: Path) -> dict[int, dict]:
    """Each rank's summary record, by rank."""
    found = {}
    for path in run.glob("metrics*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["kind"] == "summary":
                found[record["rank"]] = record
    return found


# -- parsing and validation ---------------------------------------------------------------------------------


def test_straggler_specs_parse_and_add_up_per_rank():
    assert parse_stragglers(["1:50", "3:20.5", "1:10"]) == {1: 60.0, 3: 20.5}
    assert parse_stragglers([]) == {}
    for bad in ("1", "x:5", "1:abc", "-1:5", "1:-5", "1:nan"):
        with pytest.raises(ConfigError, match="RANK:DELAY_MS"):
            parse_stragglers([bad])


def test_the_flag_repeats_and_a_config_file_holds_a_list(tmp_path):
    from distlearn.train.config import config_to_toml, load_config_file
    from distlearn.train_cli import parse_config

    flags = ["--strategy", "sync", "--workers", "3", "--straggler", "1:50", "--straggler", "2:10"]
    config = parse_config([*flags, "--straggler-dist", "exp:5"])
    assert config.straggler == ("1:50", "2:10") and config.straggler_dist == "exp:5"
    assert parse_config(["--strategy", "sync"]).straggler == ()
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(config))
    again = load_config_file(path)
    assert again.straggler == ("1:50", "2:10") and again.straggler_dist == "exp:5"


def test_distribution_specs_parse_and_bad_ones_name_the_forms():
    assert parse_distribution("none") is None
    assert parse_distribution("exp:20") == ("exp", (20.0,))
    assert parse_distribution("lognormal:10:0.5") == ("lognormal", (10.0, 0.5))
    assert parse_distribution("uniform:1:3") == ("uniform", (1.0, 3.0))
    for bad in ("exp", "exp:1:2", "gamma:3", "exp:-1", "uniform:3:1", "lognormal:a:1"):
        with pytest.raises(ConfigError, match="straggler-dist"):
            parse_distribution(bad)


def test_the_config_refuses_a_bad_delay_and_a_rank_outside_the_job():
    def refused(**values) -> str:
        with pytest.raises(ConfigError) as error:
            validate_config(TrainConfig.build(**values))
        return str(error.value)

    assert "delay >= 0" in refused(straggler=("1:-3",))
    assert "straggler-dist" in refused(straggler_dist="exp")
    assert "straggler-sleep-scale" in refused(straggler_sleep_scale=-1.0)
    assert "ranks 0..1" in refused(strategy="sync", workers=2, straggler=("2:10",))
    assert "rank 0 does not run training steps" in refused(strategy="ps", workers=3, straggler=("0:10",))
    assert "rank 0 does not run training steps" in refused(
        strategy="easgd", easgd_mode="async", workers=3, straggler=("0:10",)
    )
    validate_config(TrainConfig.build(strategy="ps", workers=3, straggler=("2:10", "1:5")))
    with pytest.raises(ConfigError, match=r"ranks 0\.\.2"):
        check_stragglers(TrainConfig.build(strategy="ps", workers=3, straggler=("3:10",)), 3, (0,))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--strategy", "sync", "--workers", "2", "--straggler", "2:10"], "ranks 0..1"),
        (["--strategy", "sync", "--workers", "2", "--straggler", "1:-5"], "delay >= 0"),
        (["--strategy", "ps", "--workers", "3", "--straggler", "0:10"], "does not run training steps"),
        (["--strategy", "sync", "--workers", "2", "--straggler-dist", "exp:-2"], "straggler-dist"),
    ],
)
def test_the_command_line_refuses_bad_stragglers_in_one_line_before_launch(tmp_path, cli, flags, words):
    # in this process (tests/train/conftest.py's cli: what a process of its own would print on stderr too)
    done = cli("train", *QUICK, "--steps", "2", *flags, "--out", str(tmp_path / "run"))
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distlearn train: error: "), done.stderr
    assert words in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "launch.toml").exists()


# -- the seeded distribution ---------------------------------------------------------------------------------


def test_drawn_delays_repeat_per_seed_rank_and_step_and_differ_otherwise():
    first = [draw_delay_ms("exp:20", 7, 1, step) for step in range(50)]
    assert first == [draw_delay_ms("exp:20", 7, 1, step) for step in range(50)]
    assert first != [draw_delay_ms("exp:20", 8, 1, step) for step in range(50)]
    assert first != [draw_delay_ms("exp:20", 7, 2, step) for step in range(50)]
    config = TrainConfig(straggler=("1:5",), straggler_dist="exp:20", seed=7)
    assert step_delay_ms(config, 1, 3) == pytest.approx(5.0 + first[3])
    assert step_delay_ms(config, 0, 3) == pytest.approx(draw_delay_ms("exp:20", 7, 0, 3))


def test_drawn_delays_follow_their_distribution():
    n = 4000
    exp = [draw_delay_ms("exp:20", 0, 1, step) for step in range(n)]
    assert min(exp) >= 0 and statistics.fmean(exp) == pytest.approx(20.0, rel=0.08)  # std/sqrt(n) = 1.6%
    assert statistics.median(exp) == pytest.approx(20.0 * math.log(2), rel=0.1)
    logn = [draw_delay_ms("lognormal:10:0.5", 0, 2, step) for step in range(n)]
    assert statistics.median(logn) == pytest.approx(10.0, rel=0.06)
    assert statistics.fmean(logn) == pytest.approx(10.0 * math.exp(0.5**2 / 2), rel=0.05)
    uniform = [draw_delay_ms("uniform:2:4", 0, 3, step) for step in range(n)]
    assert (
        min(uniform) >= 2.0
        and max(uniform) <= 4.0
        and statistics.fmean(uniform) == pytest.approx(3.0, rel=0.03)
    )


# -- real jobs ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_an_asynchronous_straggler_sleeps_its_delay_and_its_clock_adds_up(tmp_path):
    """Hogwild! waits for nobody: rank 1's 10 steps each start 100 ms late, rank 0's do not."""
    steps, delay_ms = 10, 100.0
    done = run_train(
        tmp_path, "--strategy", "hogwild", "--workers", "2", "--steps", str(steps), "--batch-size", "32",
        "--straggler", f"1:{delay_ms:g}", "--eval-every", "5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = summaries(tmp_path / "run")
    assert set(ranks) == {0, 1}
    slow, fast = ranks[1]["extra"], ranks[0]["extra"]
    assert (
        slow["straggler_delay_s"] == pytest.approx(steps * delay_ms / 1000) and fast["straggler_delay_s"] == 0
    )
    for rank in (slow, fast):  # an asynchronous rank's clock: its CPU time plus its delays
        assert rank["sim_time_s"] == pytest.approx(rank["compute_cpu_s"] + rank["straggler_delay_s"])
    # the sleep is real: rank 1's training took about the delays longer in wall time than its CPU time
    assert slow["train_seconds"] >= steps * delay_ms / 1000
    assert slow["train_seconds"] - fast["train_seconds"] > 0.5 * steps * delay_ms / 1000


@pytest.mark.timeout(300)
def test_a_synchronous_step_lasts_as_long_as_the_slower_replica(tmp_path):
    steps, delay_ms = 12, 30.0
    done = run_train(
        tmp_path, "--strategy", "sync", "--workers", "2", "--steps", str(steps),
        "--straggler", f"1:{delay_ms:g}", "--eval-every", "4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = summaries(tmp_path / "run")
    zero, one = ranks[0]["extra"], ranks[1]["extra"]
    delays = steps * delay_ms / 1000
    assert one["straggler_delay_s"] == pytest.approx(delays) and zero["straggler_delay_s"] == 0
    # sum_t max(c0_t, c1_t + d) lies between the larger of the two sums and their total
    assert zero["sim_time_s"] == pytest.approx(one["sim_time_s"])
    clock = zero["sim_time_s"]
    assert max(zero["compute_cpu_s"], one["compute_cpu_s"] + delays) <= clock + 1e-9
    assert clock <= zero["compute_cpu_s"] + one["compute_cpu_s"] + delays + 1e-9
    evals = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "eval"
    ]
    times = [record["extra"]["sim_time_s"] for record in evals]
    assert len(times) == 3 and times == sorted(times) and times[-1] == pytest.approx(clock)
    assert times[0] >= 4 * delay_ms / 1000  # 4 steps in, the straggler's 4 delays are on the clock
    # the bench reads the same numbers into its results (an Entry carries --straggler in its flags)
    from distlearn.bench.harness import collect

    numbers = collect(tmp_path / "run", 0.0)
    assert numbers["straggler_delay_s"] == {"0": 0.0, "1": pytest.approx(delays)}
    assert [point["sim_time_s"] for point in numbers["curve"]] == times


@pytest.mark.timeout(300)
def test_the_clock_is_off_by_default_and_sim_clock_alone_turns_it_on(tmp_path):
    from distlearn.train import train

    def run(name: str, **values) -> list[dict]:
        config = TrainConfig(
            model="mlp", steps=4, batch_size=64, train_samples=256, test_samples=64, eval_every=2,
            out=str(tmp_path / name), checkpoints=False, progress="off", tensorboard="off", quiet=True,
            **values,
        )  # fmt: skip
        train(config)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain")
    assert all("sim_time_s" not in record["extra"] for record in plain)
    clocked = run("clocked", sim_clock=True)
    evals = [r for r in clocked if r["kind"] == "eval"]
    summary = next(r for r in clocked if r["kind"] == "summary")["extra"]
    assert [r["step"] for r in evals] == [2, 4] and 0 < evals[0]["extra"]["sim_time_s"] < evals[1]["extra"][
        "sim_time_s"
    ]
    assert summary["straggler_delay_s"] == 0 and summary["sim_time_s"] == pytest.approx(
        summary["compute_cpu_s"]
    )
    # the clock changes no number of the run: the same losses and accuracies as without it
    strip = [(r["kind"], r["step"], r["loss"], r["accuracy"]) for r in plain if r["kind"] != "summary"]
    assert strip == [
        (r["kind"], r["step"], r["loss"], r["accuracy"]) for r in clocked if r["kind"] != "summary"
    ]
