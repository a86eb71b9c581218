"""A user's model, dataset or loss named by import path: ``package.module:name``.

    model = build_model("mypkg.nets:make_model")           # calls make_model(); an nn.Module
    train, test = build_datasets("mypkg.data:make_data")     # calls make_data(); (train, test)
    loss_fn = load_loss("mypkg.losses:smooth_l1")            # the callable itself

The command line's ``--model``, ``--dataset`` and ``--loss`` take such a path beside the built-in names; each
launched worker resolves it again in its own process (the module must be importable there: on
``PYTHONPATH`` or under the directory the command runs in). Every failure is a :class:`ConfigError` that
names the path, what went wrong and the fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from distlearn.errors import ConfigError

__all__ = ["build_datasets", "build_model", "is_import_path", "load_loss", "load_object"]


def is_import_path(value: str) -> bool:
    """Whether ``value`` has the ``package.module:name`` form (a built-in name has no colon)."""
    module, colon, name = value.partition(":")
    return bool(colon and module and name)


def load_object(path: str, what: str) -> Any:
    """The object at ``package.module:name``; ConfigError if the module does not import or lacks the name."""
    if not is_import_path(path):
        raise ConfigError(f"{what} {path!r} is not an import path; write it as package.module:name")
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error while importing the user's module is theirs to see
        raise ConfigError(
            f"{what} {path}: module {module_name!r} does not import ({type(error).__name__}: {error}); "
            "put it on PYTHONPATH or run from the directory that holds it"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{what} {path}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    return target


def _call(path: str, what: str) -> Any:
    factory = load_object(path, what)
    if not callable(factory):
        raise ConfigError(f"{what} {path} is a {type(factory).__name__}, not a factory; name a function")
    try:
        return factory()
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{what} {path}() raised {type(error).__name__}: {error}") from error


def build_model(path: str) -> nn.Module:
    """``factory()`` at ``path``, which must return a ``torch.nn.Module`` (a Module class works too)."""
    model = _call(path, "--model")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"--model {path}() returned a {type(model).__name__}, not a torch.nn.Module; "
            "return the model itself (e.g. nn.Sequential(...))"
        )
    return model


def build_datasets(path: str) -> tuple[Any, Any]:
    """``factory()`` at ``path``, which must return ``(train, test)``: each a torch Dataset, a pair of
    tensors ``(x, y)`` or an :class:`~distlearn.data.ArrayDataset` (checked by :mod:`distlearn.data.user`)."""
    pair = _call(path, "--dataset")
    if isinstance(pair, dict) and set(pair) == {"train", "test"}:
        pair = (pair["train"], pair["test"])
    if not (isinstance(pair, tuple | list) and len(pair) == 2):
        raise ConfigError(
            f"--dataset {path}() returned a {type(pair).__name__}; return (train, test), each a torch "
            "Dataset, a pair of tensors (x, y) or a distlearn.data.ArrayDataset"
        )
    return pair[0], pair[1]


def load_loss(path: str) -> Callable[..., Any]:
    """The callable at ``path``: ``loss_fn(outputs, targets) -> scalar tensor`` (a Module class is built)."""
    loss = load_object(path, "--loss")
    if isinstance(loss, type) and issubclass(loss, nn.Module):
        loss = loss()
    if not callable(loss):
        raise ConfigError(f"--loss {path} is a {type(loss).__name__}, not a callable(outputs, targets)")
    return loss
