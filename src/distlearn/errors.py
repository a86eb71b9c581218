"""The exceptions distlearn raises for bad input: each message names the problem and the fix.

The CLI prints these as one line (``distlearn: error: ...``) and exits with status 2; other exceptions
are bugs and keep their traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "DistlearnError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "CommError",
    "DivergenceError",
    "require_extra",
]


class DistlearnError(Exception):
    """Base class of the errors distlearn reports to a user."""


class ConfigError(DistlearnError, ValueError):
    """A configuration value or combination that cannot work."""


class DataError(DistlearnError):
    """A dataset that is missing, corrupt, truncated or fails its checksum."""


class CheckpointError(DistlearnError):
    """A checkpoint that cannot be written or read."""


class CommError(DistlearnError, RuntimeError):
    """A collective or point-to-point operation that failed or timed out, or a peer that died."""


class DivergenceError(DistlearnError, ArithmeticError):
    """Training diverged: a non-finite loss, gradient or weight, or a loss that exploded. The message names
    the step, the value, the likely cause (the learning rate) and the last good checkpoint to resume from."""


def require_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import the optional ``module`` (from the ``distlearn[extra]`` extra) or raise a ConfigError naming
    the extra to install. Called inside the function that needs it, so the core never imports extras."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"{needed_for} needs {module.split('.')[0]}, which is not installed ({error}); "
            f"install it with: pip install 'distlearn[{extra}]'"
        ) from error
