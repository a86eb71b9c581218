"""``distlearn toy`` end to end: files written, JSON consistent with the run, bad input gives exit code 2."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from distlearn.cli import main
from distlearn.toy.functions import get_function
from distlearn.toy.plots import frame_schedule
from distlearn.toy.problems import PROBLEM_NAMES
from distlearn.toy.runner import Trajectory, optimizer_names, run_optimizers, steps_to_tolerance


def test_toy_writes_png_gif_and_json(tmp_path, capsys):
    code = main(
        [
            "toy",
            "--function",
            "rosenbrock",
            "--optimizers",
            "sgd,adam",
            "--steps",
            "12",
            "--frames",
            "4",
            "--tolerance",
            "100",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    with Image.open(tmp_path / "rosenbrock.png") as png:
        assert png.format == "PNG" and png.size[0] > 500
    with Image.open(tmp_path / "rosenbrock.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 4
    record = json.loads((tmp_path / "rosenbrock.json").read_text())
    assert list(record["runs"]) == ["sgd", "adam"]
    expected = run_optimizers(get_function("rosenbrock"), "sgd,adam", steps=12)
    for name, run in record["runs"].items():
        assert run["points"] == expected[name].points  # the JSON holds the raw trajectory
        assert Trajectory.from_dict(run) == expected[name]
        row = next(r for r in record["table"] if r["optimizer"] == name)
        assert row["steps_to_tolerance"] == steps_to_tolerance(run["losses"], 0.0, 100.0)
    out = capsys.readouterr().out
    assert "steps to f - f* <= 100" in out and "adam" in out


def test_not_reached_is_reported(tmp_path, capsys):
    assert (
        main(
            [
                "toy",
                "--function",
                "beale",
                "--optimizers",
                "sgd",
                "--steps",
                "3",
                "--no-gif",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "not reached" in capsys.readouterr().out
    assert not (tmp_path / "beale.gif").exists() and (tmp_path / "beale.json").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--function", "rosenbrok"], ["unknown toy function 'rosenbrok'", *PROBLEM_NAMES, "--function"]),
        (["--optimizers", "sgd,adamw"], ["unknown optimizer(s) 'adamw'", "--optimizers"]),
        (["--lr", "fast"], ["cannot read --lr 'fast'", "--lr 0.01"]),
        (["--steps", "0"], ["--steps must be at least 1"]),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_the_fix(tmp_path, capsys, flags, expected):
    code = main(["toy", *flags, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("distlearn toy: error:")
    for text in expected:
        assert text in err
    if "--optimizers" in flags:
        for name in optimizer_names():
            assert name in err


def test_toml_config_with_flags_overriding(tmp_path):
    config = tmp_path / "toy.toml"
    config.write_text('function = "saddle"\noptimizers = "adam"\nsteps = 7\ngif = false\n')
    assert main(["toy", "--config", str(config), "--steps", "5", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "saddle.json").read_text())
    assert record["config"]["steps"] == 5 and record["config"]["optimizers"] == "adam"
    assert len(record["runs"]["adam"]["points"]) == 6
    config.write_text('function = "saddle"\nstepz = 3\n')
    assert main(["toy", "--config", str(config), "--out", str(tmp_path)]) == 2


def test_frame_schedule_is_increasing_and_covers_the_run():
    ticks = frame_schedule(1000, 50)
    assert ticks[0] == 0 and ticks[-1] == 1000
    assert ticks == sorted(set(ticks))
    assert ticks[1] - ticks[0] < ticks[-1] - ticks[-2]  # early steps are shown more densely
    assert frame_schedule(3, 50) == [0, 1, 2, 3]


def test_markdown_table_marks_unreached_and_line_search_counts():
    from distlearn.toy.docs_figures import markdown_table
    from distlearn.toy.experiment import ProblemResult, Row

    rows = [
        Row("sgd", 0.1, None, None, 0.25, [0.0, 0.0], False),
        Row("cg-fr", 1.0, 4, 11, 0.0, [1.0, 1.0], False),
        Row("adam", 0.1, 7, 7, 0.0, [1.0, 1.0], False),
    ]
    table = markdown_table([ProblemResult("rosenbrock", rows, [])], 1e-6)
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert lines[0] == ["problem", "sgd", "cg-fr", "adam"]
    assert lines[2] == ["rosenbrock", "— (2.5e-01)", "4 (11 ev.)", "7"]
    assert table.splitlines()[1] == "|------------|------------:|-----------:|-----:|"  # counts right-aligned
