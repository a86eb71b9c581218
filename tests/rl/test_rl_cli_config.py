"""``distlearn rl``'s typed config: one options dataclass per algorithm, a flag of another algorithm refused
before anything starts, ``--config`` files, the workers' argv, the summary table and file, metrics records
the plot and TensorBoard draw, and the OUT check."""

from __future__ import annotations

import dataclasses
import json

import pytest

from distlearn.errors import ConfigError
from distlearn.metrics import read_metrics, tensorboard_available
from distlearn.rl.cli import command, parse_config, to_argv
from distlearn.rl.config import ALGORITHMS, OPTIONS, A3COptions, GorilaOptions, config_for, flat_values

TINY = ["--total-steps", "64", "--num-envs", "2", "--rollout-steps", "8", "--minibatches", "2"]
TINY += ["--ppo-epochs", "1", "--no-stop-when-solved", "--log-every", "0", "--quiet"]


@pytest.mark.parametrize(
    ("algorithm", "flag", "owner"),
    [
        ("a3c", "--double-q", "gorila"),
        ("a3c", "--buffer-size", "gorila"),
        ("a3c", "--ppo-epochs", "naive / sync-pg"),
        ("gorila", "--num-envs", "naive / a3c / sync-pg"),
        ("sync-pg", "--servers", "a3c"),
        ("naive", "--reducer", "sync-pg"),
    ],
)
def test_a_flag_of_another_algorithm_is_refused_before_anything_starts(
    tmp_path, capsys, algorithm, flag, owner
):
    out = tmp_path / "run"
    value = [] if flag == "--double-q" else ["3"]
    assert command([algorithm, "--out", str(out), flag, *value]) == 2
    message = capsys.readouterr().err
    assert f"{flag} is an option of {owner}, not of {algorithm}" in message
    assert not out.exists()  # refused before any process started or wrote anything


def test_every_algorithm_has_its_own_options_and_the_common_ones():
    gorila = parse_config(
        "gorila", ["--buffer-size", "10", "--batch-size", "4", "--no-double-q", "--lr", "1e-3"]
    )
    assert isinstance(gorila.options, GorilaOptions)
    assert (gorila.buffer_size, gorila.batch_size, gorila.double_q, gorila.lr) == (10, 4, False, 1e-3)
    a3c = parse_config("a3c", ["--servers", "1", "--rollout-steps", "5", "--workers", "3"])
    assert isinstance(a3c.options, A3COptions) and (a3c.servers, a3c.rollout_steps, a3c.workers) == (1, 5, 3)
    own = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in OPTIONS.items()}
    assert (
        "double_q" not in own["a3c"] and "ppo_epochs" not in own["gorila"] and "servers" not in own["naive"]
    )
    for cls in OPTIONS.values():  # every option documented (the docstring under the field is its --help)
        assert cls.__doc__


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "rl.toml"
    path.write_text(
        'env = "Acrobot-v1"\nseed = 7\nlr = 0.01\n[a3c]\nrollout-steps = 6\nservers = 1\n'
        "[gorila]\nbuffer_size = 5\n"  # another algorithm's table: ignored, one file serves all
    )
    config = parse_config("a3c", ["--config", str(path), "--seed", "9"])
    assert (config.env, config.seed, config.lr, config.rollout_steps, config.servers) == (
        "Acrobot-v1",
        9,
        0.01,
        6,
        1,
    )
    assert config.num_envs == A3COptions().num_envs  # the default where neither file nor flag set it
    path.write_text("double_q = false\n")
    with pytest.raises(ConfigError, match="--double-q is an option of gorila, not of a3c"):
        parse_config("a3c", ["--config", str(path)])
    path.write_text("[a3c]\nppo_epochs = 3\n")
    with pytest.raises(ConfigError, match=r"\[a3c\] has no option 'ppo_epochs'"):
        parse_config("a3c", ["--config", str(path)])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_workers_argv_rebuilds_the_config(algorithm):
    changed = {"seed": 11, "lr": 0.125, "anneal_lr": False, "out": "runs/x", "timeout": 7.5}
    changed |= {
        "sync-pg": {"reducer": "tree", "algo": "a2c", "clip": 0.3},
        "naive": {"ppo_epochs": 2, "gae_lambda": 1.0},
        "a3c": {"servers": 2, "entropy_coef": 0.05},
        "gorila": {"double_q": False, "eps_end": 0.05, "buffer_size": 77},
    }[algorithm]
    config = config_for(algorithm, changed)
    assert parse_config(algorithm, to_argv(config)) == config
    assert flat_values(parse_config(algorithm, to_argv(config))) == flat_values(config)


@pytest.mark.timeout(60)
def test_a_run_prints_the_summary_table_writes_summary_json_and_metrics_the_plot_draws(tmp_path, capsys):
    out = tmp_path / "run"
    tensorboard = ["--tensorboard", "on"] if tensorboard_available() else []
    assert command(["sync-pg", "--out", str(out), *TINY, "--no-quiet", *tensorboard]) == 0
    printed = capsys.readouterr().out
    assert "distlearn rl sync-pg/ppo: summary" in printed and "env steps" in printed and "64" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 4 and summary["env_steps"] == 64 and summary["env"] == "CartPole-v1"
    assert summary["config"]["num_envs"] == 2
    records = read_metrics(out)
    train = [r for r in records if r.kind == "train"]
    assert [r.step for r in train] == [1, 2, 3, 4]
    assert all(r.loss is not None and r.samples_per_s > 0 and r.lr is not None for r in train)
    from distlearn.plot_cli import _is_rl, _series, plot_runs

    assert _is_rl(records)
    assert len(_series(records, "train", "loss", "step")[0]) == 4
    assert len(_series(records, "train", "episode_return", "step")[0]) >= 1  # episodes ended in 64 steps
    assert plot_runs([out], tmp_path / "curves.png").stat().st_size > 0
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard" / "rank0"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/samples_per_s", "train/episode_return"} <= tags
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.timeout(60)
def test_an_out_holding_a_run_is_refused_unless_overwrite_or_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert command(["sync-pg", "--out", str(out), *TINY]) == 0
    assert command(["sync-pg", "--out", str(out), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert command(["sync-pg", "--out", str(out), *TINY, "--checkpoint-every", "2", "--overwrite"]) == 0
    assert (out / "checkpoints" / "step-00000004.pt").is_file()
    assert len([r for r in read_metrics(out) if r.kind == "summary"]) == 1  # the old run's records are gone
