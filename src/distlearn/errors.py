"""The exceptions distlearn raises for bad input: each message names the problem and the fix.

The CLI prints these as one line (``distlearn: error: ...``) and exits with status 2; other exceptions
are bugs and keep their traceback.
"""

from __future__ import annotations

__all__ = ["DistlearnError", "ConfigError", "DataError", "CheckpointError", "CommError"]


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
