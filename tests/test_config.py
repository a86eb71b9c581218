from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from distlearn.config import ConfigError, from_dict, load_toml
from distlearn.config import parse as parse_config


@dataclass
class Example:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "number of steps"})
    name: Literal["a", "b"] = field(default="a", metadata={"help": "which one"})
    verbose: bool = field(default=False, metadata={"help": "talk more"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes"})


def parse(cls, argv):
    return parse_config(cls, argv, prog="example")


def test_defaults_and_flags_round_trip():
    assert parse(Example, []) == Example()
    got = parse(Example, ["--lr", "0.5", "--name", "b", "--verbose", "--sizes", "3", "4"])
    assert got == Example(lr=0.5, name="b", verbose=True, sizes=(3, 4))
    got = parse(Example, ["--no-verbose", "--sizes", "7"])
    assert got == Example(verbose=False, sizes=(7,))


def test_bad_choice_is_rejected(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse(Example, ["--name", "c"])
    assert stopped.value.code == 2
    assert "c" in capsys.readouterr().err


def test_help_comes_from_the_fields_metadata(capsys):
    with pytest.raises(SystemExit):
        parse(Example, ["--help"])
    shown = capsys.readouterr().out
    assert "learning rate" in shown and "which one" in shown and "--sizes" in shown


def test_toml_supplies_defaults_that_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nsteps = 7\nname = "b"\n')
    assert load_toml(Example, path) == Example(lr=0.01, steps=7, name="b")
    got = parse(Example, ["--config", str(path), "--steps", "3"])
    assert got == Example(lr=0.01, steps=3, name="b")


def test_unknown_and_invalid_keys_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*known options are"):
        from_dict(Example, {"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(Example, {"name": "z"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(Example, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(Example, bad)
