"""Checksummed downloads: canonical URL, retries with back-off, a progress bar, atomic rename.

A file is fetched to ``DEST.part``, hashed while it streams, and renamed to ``DEST`` only when its size and
checksum match; a mismatch deletes the partial file and raises :class:`DataError` at once (a corrupt mirror
is not retried, so there is never a re-download loop). Network errors and connections that drop mid-way
are retried ``retries`` times with exponential back-off, then reported with what to do offline.

Libraries: ``urllib.request`` (HTTP), ``hashlib`` (SHA-256, or the publisher's MD5 where no SHA-256 is
published), ``rich`` (progress bar).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distlearn.errors import ConfigError, DataError

__all__ = ["RemoteFile", "download", "file_digest"]


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: its URLs (tried in order) and its checksum (``sha256`` preferred, else ``md5``)."""

    name: str
    urls: tuple[str, ...]
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if not (self.sha256 or self.md5):
            raise ConfigError(f"{self.name}: a remote file needs a sha256 or md5 checksum")

    @property
    def algorithm(self) -> str:
        return "sha256" if self.sha256 else "md5"

    @property
    def digest(self) -> str:
        return (self.sha256 or self.md5 or "").lower()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def download(
    remote: RemoteFile,
    directory: str | Path,
    *,
    retries: int = 3,
    timeout_s: float = 30.0,
    backoff_s: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch ``remote`` into ``directory`` (kept if already there and valid); returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    destination = directory / remote.name
    if destination.exists():
        if file_digest(destination, remote.algorithm) == remote.digest:
            return destination
        raise DataError(
            f"{destination} exists but its {remote.algorithm} does not match the published one; "
            "it is damaged or a different file: delete it and run again"
        )
    partial = destination.with_name(destination.name + ".part")
    errors: list[str] = []
    for url in remote.urls:
        for attempt in range(retries + 1):
            try:
                _fetch(url, partial, remote, timeout_s, progress)
            except _ChecksumMismatch as mismatch:
                partial.unlink(missing_ok=True)
                raise DataError(
                    f"{url}: the downloaded file's {remote.algorithm} is {mismatch.found}, expected "
                    f"{remote.digest}; the mirror serves a different or damaged file. Not retrying; "
                    f"place a good copy at {destination} or set DISTLEARN_DATA"
                ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, _Incomplete) as error:
                partial.unlink(missing_ok=True)
                errors.append(f"{url} (attempt {attempt + 1}): {error}")
                if attempt < retries:
                    time.sleep(backoff_s * 2**attempt)
                continue
            os.replace(partial, destination)  # atomic: the file appears complete or not at all
            return destination
    raise DataError(
        f"could not download {remote.name} ({'; '.join(errors[-2:])}). Without network: copy the file to "
        f"{destination}, or point DISTLEARN_DATA / --data-root at a directory that holds the dataset"
    )


class _ChecksumMismatch(Exception):
    def __init__(self, found: str) -> None:
        self.found = found


class _Incomplete(Exception):
    pass


def _fetch(url: str, partial: Path, remote: RemoteFile, timeout_s: float, progress: bool) -> None:
    hasher = hashlib.new(remote.algorithm)
    with contextlib.ExitStack() as stack:
        response = stack.enter_context(urllib.request.urlopen(url, timeout=timeout_s))  # noqa: S310
        total = int(response.headers.get("Content-Length") or 0) or None
        out = stack.enter_context(open(partial, "wb"))
        bar = None
        if progress:
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            bar = stack.enter_context(
                Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            )
            task = bar.add_task(f"downloading {remote.name}", total=total)
        received = 0
        while True:
            block = response.read(1 << 16)
            if not block:
                break
            out.write(block)
            hasher.update(block)
            received += len(block)
            if bar is not None:
                bar.update(task, completed=received)
    if total is not None and received != total:
        raise _Incomplete(f"connection closed after {received:,} of {total:,} bytes")
    found = hasher.hexdigest()
    if found != remote.digest:
        raise _ChecksumMismatch(found)
