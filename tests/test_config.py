from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from distlearn.config import ConfigError, add_arguments, from_dict, load_toml, parse


@dataclass
class Example:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "number of steps"})
    name: Literal["a", "b"] = field(default="a", metadata={"help": "which one"})
    verbose: bool = field(default=False, metadata={"help": "talk more"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser, Example)
    return parser


def test_defaults_and_flags_round_trip():
    assert parse(Example, _parser(), []) == Example()
    got = parse(Example, _parser(), ["--lr", "0.5", "--name", "b", "--verbose", "--sizes", "3", "4"])
    assert got == Example(lr=0.5, name="b", verbose=True, sizes=(3, 4))


def test_bad_choice_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse(Example, _parser(), ["--name", "c"])
    assert "invalid choice" in capsys.readouterr().err


def test_toml_supplies_defaults_that_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.01\nsteps = 7\nname = "b"\n')
    assert load_toml(Example, path) == Example(lr=0.01, steps=7, name="b")
    got = parse(Example, _parser(), ["--config", str(path), "--steps", "3"])
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
