"""Typed configuration: one dataclass serves the CLI, a config file and the Python API.

The one merge rule of every command: **defaults < config file < flags**. :func:`read_file` reads a TOML
(or YAML) file into a mapping, :func:`from_dict` builds the dataclass from it (unknown keys and bad choices
are refused with the known names), and :func:`parse` applies the command line on top of that instance
with `tyro <https://brentyi.github.io/tyro/>`_, which generates the flags (``--field-name``) and their
help (the docstring under each field, or ``field(metadata={"help": ...})``) from the dataclass itself.
:func:`parse_options` reads ``KEY=VALUE`` lists (``--optimizer-option momentum=0.9``).

:func:`add_arguments` and :func:`from_args` build argparse options from such a dataclass for commands that
take no config file (``distlearn rl``), as a subcommand's options.

Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--flag`` / ``--no-flag``),
``Literal[...]`` (choices), ``Optional[X]`` and ``tuple[X, ...]`` / ``list[X]`` of those scalars.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from distlearn.errors import ConfigError

__all__ = [
    "ConfigError",
    "add_arguments",
    "flag",
    "flags_of",
    "foreign_flag",
    "from_args",
    "from_dict",
    "check_type",
    "help_of",
    "load_toml",
    "mapping_to_toml",
    "parse",
    "parse_options",
    "positive",
    "read_file",
    "to_toml",
]

T = TypeVar("T")


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, name: str):
    """Return (type callable, choices, nargs) for a scalar or sequence field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        kind = type(choices[0])
        return kind, list(choices), None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner, choices, _ = _converter(args[0] if args else str, name)
        return inner, choices, "+"
    if tp in (int, float, str):
        return tp, None, None
    raise TypeError(f"config field {name!r}: unsupported type {tp!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--option`` per field of dataclass ``cls`` to ``parser``, defaults and help included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        kind, choices, nargs = _converter(tp, f.name)
        shown = "" if default is None and optional else " (default: %(default)s)"
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            choices=choices,
            nargs=nargs,
            default=default,
            help=help_text + shown,
            metavar=None if choices else f.name.upper(),
        )


def from_dict(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys with a message that names the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown option(s) {', '.join(unknown)}; known options are: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        tp, _ = _unwrap_optional(hints[key])
        if typing.get_origin(tp) in (list, tuple) and isinstance(value, list):
            value = tuple(value) if typing.get_origin(tp) is tuple else list(value)
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{source}: {key}={value!r} is not one of {list(typing.get_args(tp))}")
        check_type(key, value, hints[key], source)
        kwargs[key] = value
    return cls(**kwargs)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _fits(value: Any, tp: Any) -> bool:
    """True when ``value`` (as read from a file) can be field type ``tp``; types not listed pass."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:  # the choices are checked by from_dict and the options' validate
        return True
    if origin in (list, tuple):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_fits(v, inner[0]) for v in value if inner)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        names = [_expected(arg) for arg in typing.get_args(tp) if arg is not type(None)]
        return " or ".join(names) + (" (or leave the key out)" if type(None) in typing.get_args(tp) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not inner:
            return "a list"
        return f"a list of {_expected(inner[0]).removeprefix('a ').removeprefix('an ')}s"
    return _KINDS.get(tp, getattr(tp, "__name__", str(tp)))


def _kind_of(value: Any) -> str:
    for kind, name in _KINDS.items():
        if isinstance(value, kind):
            return name.replace("true or false", "a boolean")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def check_type(key: str, value: Any, tp: Any, source: str = "config") -> None:
    """ConfigError unless ``value`` fits field type ``tp``, naming the key, the value and the type expected.

    Covers the types a config file can hold (numbers, strings, booleans, lists of them, optional ones);
    an ``int`` is a valid ``float``, a ``bool`` is no number.
    """
    if not _fits(value, tp):
        raise ConfigError(f"{source}: {key} = {value!r} is {_kind_of(value)}; expected {_expected(tp)}")


def from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build ``cls`` from parsed arguments (the fields :func:`add_arguments` added)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not hasattr(namespace, f.name):
            continue
        value = getattr(namespace, f.name)
        if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[f.name])[0]) is tuple:
            value = tuple(value)
        values[f.name] = value
    return from_dict(cls, values, source="command line")


def flag(name: str) -> str:
    """The command-line flag of option ``name``: ``bucket_mb`` -> ``--bucket-mb``."""
    return "--" + name.replace("_", "-")


def positive(
    name: str,
    value: float | None,
    *,
    allow_none: bool = False,
    allow_zero: bool = False,
    integer: bool = False,
) -> None:
    """ConfigError unless ``value`` is > 0 (>= 0 with ``allow_zero``; None allowed with ``allow_none``)."""
    if value is None and allow_none:
        return
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ConfigError(f"{flag(name)} must be a number, got {value!r} ({type(value).__name__})")
    bad_type = integer and (not isinstance(value, int) or isinstance(value, bool))
    if bad_type or value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        kind = "an integer " if integer else ""
        raise ConfigError(f"{flag(name)} must be {kind}{bound}, got {value!r}")


def parse_options(options: tuple[str, ...] | list[str], what: str = "optimizer") -> dict[str, Any]:
    """``("momentum=0.9", "betas=0.9,0.99", "nesterov=true")`` -> ``{"momentum": 0.9, ...}``."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"{what} option {option!r} is not KEY=VALUE; write e.g. momentum=0.9")
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            parsed[key] = lowered == "true"
            continue
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{what} option {option!r}: {text!r} is not a number, tuple or true/false"
            ) from None
        parsed[key] = value
    return parsed


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file's mapping: TOML, or YAML (``.yaml``/``.yml``) when PyYAML is installed.

    Keys are normalised to field names (``batch-size`` -> ``batch_size``), also inside tables (sections).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing TOML or YAML file")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise ConfigError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write it as TOML"
            ) from None
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return _normalise(values)


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    return {
        str(key).replace("-", "_"): _normalise(value) if isinstance(value, dict) else value
        for key, value in values.items()
    }


def parse(cls: type[T], argv: list[str] | None = None, *, prog: str, description: str = "") -> T:
    """``cls`` from the command line by the one merge rule: defaults < ``--config FILE`` < flags.

    The flags are generated by tyro from ``cls`` (help: the docstring under each field, or a field's
    ``metadata["help"]``); bad flags exit with status 2 and tyro's message, as argparse does.
    """
    import tyro

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    known, rest = first.parse_known_args(argv)
    default = from_dict(cls, read_file(known.config), source=known.config) if known.config else cls()
    flags = _with_help(cls)
    values = {f.name: getattr(default, f.name) for f in dataclasses.fields(cls)}
    parsed = tyro.cli(flags, args=rest, default=flags(**values), prog=prog, description=description)
    return cls(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls)})


def _with_help(cls: type) -> type:
    """``cls`` itself, or a copy whose fields carry their ``metadata["help"]`` for tyro."""
    if not any("help" in f.metadata for f in dataclasses.fields(cls)):
        return cls
    import tyro

    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kind = typing.Annotated[hints[f.name], tyro.conf.arg(help=f.metadata.get("help", ""))]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        fields.append((f.name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(cls.__name__, fields, frozen=False)


def load_toml(cls: type[T], path: str | Path) -> T:
    """Read a config of type ``cls`` from a TOML file (top-level keys are the field names)."""
    return from_dict(cls, read_file(path), source=str(path))


def to_toml(instance: Any) -> str:
    """The dataclass ``instance`` as TOML that :func:`load_toml` reads back to an equal instance.

    Fields whose value is None are left out (they take their default, which is None for such fields).
    """
    return mapping_to_toml({f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)})


def mapping_to_toml(values: dict[str, Any]) -> str:
    """``values`` as TOML: scalars and lists first, then each dataclass or mapping value as a ``[table]``."""
    lines, tables = [], []
    for name, value in values.items():
        if value is None:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            body = mapping_to_toml(value)
            tables.append(f"[{name}]\n{body}")
            continue
        lines.append(f"{name} = {_toml_value(value, name)}")
    return "\n".join(lines) + "\n" + "".join(tables)


def _toml_value(value: Any, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value} cannot be written to a config file; use a finite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, name) for v in value) + "]"
    raise ConfigError(f"{name}={value!r} ({type(value).__name__}) cannot be written to a TOML config file")


def flags_of(names: Any) -> set[str]:
    """The command-line flags of field ``names``: ``--name-with-dashes`` and its ``--no-`` form."""
    return {prefix + name.replace("_", "-") for name in names for prefix in ("--", "--no-")}


def foreign_flag(argv: list[str], mine: set[str], owners: Any) -> tuple[str, list[str]] | None:
    """The first flag of ``argv`` that is not in ``mine`` but an option of others (``owners(name)`` lists
    them: strategies, algorithms), as ``(flag, owners)``; None when every flag is ours or unknown to all
    (tyro then reports an unknown one)."""
    for word in argv:
        given = word.split("=", 1)[0]
        if not given.startswith("--") or given in mine:
            continue
        belongs = owners(given.removeprefix("--").removeprefix("no-").replace("-", "_"))
        if belongs:
            return given, list(belongs)
    return None
