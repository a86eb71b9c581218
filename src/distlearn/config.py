"""Typed configuration: one dataclass serves the CLI, a TOML config file and the Python API.

A config is a plain ``@dataclass`` whose fields carry their help text in ``field(metadata={"help": ...})``.
:func:`add_arguments` turns it into argparse options (``--field-name``), :func:`from_args` builds the
dataclass back from the parsed namespace, and :func:`load_toml` reads the same fields from a file, so
the three entry points cannot drift apart.

Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--flag`` / ``--no-flag``),
``Literal[...]`` (choices), ``Optional[X]`` and ``tuple[X, ...]`` / ``list[X]`` of those scalars.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from distlearn.errors import ConfigError

__all__ = [
    "ConfigError",
    "add_arguments",
    "from_args",
    "from_dict",
    "help_of",
    "load_toml",
    "parse",
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
        kwargs[key] = value
    return cls(**kwargs)


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


def parse(cls: type[T], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> T:
    """Parse ``argv`` into ``cls``; a ``--config FILE`` (TOML) supplies defaults the flags override.

    ``parser`` must already have the fields (:func:`add_arguments`) and a ``--config`` option.
    """
    namespace = parser.parse_args(argv)
    config_path = getattr(namespace, "config", None)
    if config_path:
        base = load_toml(cls, config_path)
        parser.set_defaults(**dataclasses.asdict(base))  # type: ignore[call-overload]
        namespace = parser.parse_args(argv)
    return from_args(cls, namespace)


def load_toml(cls: type[T], path: str | Path) -> T:
    """Read a config of type ``cls`` from a TOML file (top-level keys are the field names)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing TOML file")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    values = {key.replace("-", "_"): value for key, value in values.items()}
    return from_dict(cls, values, source=str(path))


def to_toml(instance: Any) -> str:
    """The dataclass ``instance`` as TOML that :func:`load_toml` reads back to an equal instance.

    Fields whose value is None are left out (they take their default, which is None for such fields).
    """
    lines = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if value is None:
            continue
        lines.append(f"{f.name} = {_toml_value(value, f.name)}")
    return "\n".join(lines) + "\n"


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
