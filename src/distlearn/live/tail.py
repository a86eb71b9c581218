"""Follow the metrics files of runs as they grow: complete lines only, every bad line reported, never fatal.

A run directory written by ``distlearn train --out DIR`` holds ``metrics.jsonl`` (rank 0) and
``metrics.rank<k>.jsonl`` (the other ranks), one :class:`distlearn.metrics.MetricRecord` per line (schema in
:mod:`distlearn.metrics`). A process appends to these files while it trains, so a reader (woken by
:mod:`distlearn.live.watch` when they change) sees:

* a last line still being written: :class:`FileTail` keeps the bytes after the last newline and hands the
  line over only once its newline has arrived;
* a file rewritten from the start (a new run in the same directory): the file is shorter than what was
  read, so reading starts again from byte 0 and a ``reset`` event tells the page to forget that file;
* a malformed line (not JSON, not an object, an unknown schema version, a missing key): a ``problem``
  event naming ``file:line`` and what is wrong; the following lines are read as usual;
* a directory that does not exist (yet): one ``problem`` event, then the tail waits for it to appear.

Parameter-server runs also leave ``ps-server<k>.json`` (see :mod:`distlearn.parallel.ps`) with the exact
staleness of every applied update; once it appears, a ``staleness`` event carries its histogram.

:class:`RunTail` turns all of this into a list of plain-dict events per :meth:`RunTail.poll`, which the
server sends to the page as server-sent events. :class:`RunDiscovery` finds run directories under a root
(``distlearn live`` with no arguments watches ``runs/``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from distlearn.errors import DataError
from distlearn.metrics import MetricRecord, metrics_files

__all__ = ["Event", "FileTail", "RunDiscovery", "RunTail", "is_run_dir", "metrics_files"]

log = logging.getLogger("distlearn.live")

Event = dict[str, Any]
"""One event for the page: ``{"type": ..., "run": run id, ...}`` (see :class:`RunTail`)."""

_RANK_FILE = re.compile(r"^metrics\.rank(\d+)\.jsonl$")
_SERVER_REPORT = re.compile(r"^ps-server(\d+)\.json$")

# Read at most this much of a file per read, so one huge file cannot stall the other runs' updates.
MAX_BYTES_PER_POLL = 4 * 1024 * 1024


def is_run_dir(directory: Path) -> bool:
    """True when ``directory`` holds at least one metrics file."""
    return bool(metrics_files(directory))


class FileTail:
    """The complete new lines of one growing file, with their 1-based line numbers.

    ``read()`` returns the lines completed since the previous call; bytes after the last newline wait for
    the rest of their line. If the file shrank (it was rewritten), ``read()`` starts over from byte 0 and
    sets ``restarted`` so the caller can drop what it had from this file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.line_number = 0
        self.partial = b""
        self.restarted = False

    def read(self) -> list[tuple[int, bytes]]:
        self.restarted = False
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # rewritten from the start: a new run wrote over the old file
            self.offset, self.line_number, self.partial = 0, 0, b""
            self.restarted = True
        if size == self.offset:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(min(size - self.offset, MAX_BYTES_PER_POLL))
        self.offset += len(data)
        pieces = (self.partial + data).split(b"\n")
        self.partial = pieces.pop()  # b"" when the data ended with a newline
        lines = []
        for piece in pieces:
            self.line_number += 1
            if piece.strip():
                lines.append((self.line_number, piece))
        return lines


def _non_finite(name: str) -> None:
    """NaN and +-Infinity (which Python's json accepts and JavaScript's does not) read as null, as written."""
    return None


def parse_record(raw: bytes, source: str) -> dict[str, Any]:
    """One metrics line as a record dict; raises DataError naming ``source`` (``file:line``) if malformed.

    Non-finite numbers become null, the way :class:`distlearn.metrics.MetricsWriter` writes them.
    """
    try:
        values = json.loads(raw.decode("utf-8"), parse_constant=_non_finite)
    except UnicodeDecodeError as error:
        raise DataError(f"{source}: not UTF-8 text ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{source}: not a JSON object ({error.msg} at column {error.colno})") from error
    if not isinstance(values, dict):
        raise DataError(f"{source}: not a JSON object (a {type(values).__name__})")
    record = MetricRecord.from_dict(values, source=source)
    for name in ("step", "rank", "world_size"):
        value = getattr(record, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{source}: {name} must be an integer, got {value!r}")
    numbers = ("epoch", "wall_time", "loss", "accuracy", "samples_per_s", "lr", "bytes_sent", "staleness")
    for name in numbers:
        value = getattr(record, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise DataError(f"{source}: {name} must be a number or null, got {value!r}")
    if record.kind not in ("train", "eval", "summary"):
        raise DataError(f"{source}: kind must be train, eval or summary, got {record.kind!r}")
    return asdict(record)


class RunTail:
    """Events for one run directory (or one metrics file), polled.

    Each :meth:`poll` returns a list of events, in this order:

    * ``{"type": "problem", "run", "level": "error"|"info", "message"}``: a missing directory (once, until
      it appears), a malformed line (once per line);
    * ``{"type": "reset", "run", "file", "rank"}``: a file was rewritten; forget its earlier records;
    * ``{"type": "records", "run", "records": [record dict, ...]}``: new complete, valid records;
    * ``{"type": "staleness", "run", "counts": {staleness: updates}, "source"}``: the exact per-update
      staleness from the parameter servers' reports, when they exist.

    Problems are also logged (``distlearn.live`` logger, warning level).
    """

    def __init__(self, run_id: str, path: str | Path) -> None:
        self.run_id = run_id
        self.path = Path(path)
        self.tails: dict[Path, FileTail] = {}
        self.missing_reported = False
        self.reports_seen: dict[Path, float] = {}

    def _problem(self, message: str, level: str = "error") -> Event:
        if level == "error":
            log.warning("%s", message)
        else:
            log.info("%s", message)
        return {"type": "problem", "run": self.run_id, "level": level, "message": message}

    def _files(self) -> list[Path] | None:
        if self.path.is_file():
            return [self.path]
        if self.path.is_dir():
            return metrics_files(self.path)
        return None

    def poll(self) -> list[Event]:
        events: list[Event] = []
        files = self._files()
        if files is None:
            if not self.missing_reported:
                self.missing_reported = True
                events.append(
                    self._problem(
                        f"run directory {self.path} does not exist; check the path, or start the run with "
                        f"`distlearn train --out {self.path}` (the page picks it up when it appears)"
                    )
                )
            return events
        if self.missing_reported:
            self.missing_reported = False
            events.append(self._problem(f"run directory {self.path} appeared; following it", level="info"))
        records: list[dict[str, Any]] = []
        for file in files:
            tail = self.tails.setdefault(file, FileTail(file))
            lines = tail.read()
            if tail.restarted:
                match = _RANK_FILE.match(file.name)
                rank = int(match.group(1)) if match else 0
                events.append({"type": "reset", "run": self.run_id, "file": file.name, "rank": rank})
                records = [r for r in records if r["file"] != file.name]
            for number, raw in lines:
                try:
                    record = parse_record(raw, f"{file}:{number}")
                except DataError as error:
                    events.append(self._problem(f"skipped a malformed metrics line: {error}"))
                    continue
                record["file"] = file.name
                records.append(record)
        if records:
            events.append({"type": "records", "run": self.run_id, "records": records})
        if self.path.is_dir():
            events.extend(self._staleness_reports())
        return events

    def _staleness_reports(self) -> list[Event]:
        """The parameter servers' per-update staleness, merged over servers, when a report is new."""
        try:
            reports = sorted(self.path / n for n in os.listdir(self.path) if _SERVER_REPORT.match(n))
        except OSError:
            return []
        changed = False
        for report in reports:
            try:
                stamp = report.stat().st_mtime
            except OSError:
                continue
            if self.reports_seen.get(report) != stamp:
                self.reports_seen[report] = stamp
                changed = True
        if not changed:
            return []
        counts: Counter[int] = Counter()
        events: list[Event] = []
        for report in reports:
            try:
                updates = json.loads(report.read_text(encoding="utf-8"))["updates"]
                counts.update(int(update[2]) for update in updates)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
                events.append(self._problem(f"could not read the staleness in {report}: {error!r}"))
        if counts:
            events.append(
                {
                    "type": "staleness",
                    "run": self.run_id,
                    "counts": {str(k): v for k, v in sorted(counts.items())},
                    "source": ", ".join(r.name for r in reports),
                }
            )
        return events


class RunDiscovery:
    """Run directories under ``root`` (up to ``depth`` levels down), new ones reported as they appear."""

    def __init__(self, root: str | Path, depth: int = 3) -> None:
        self.root = Path(root)
        self.depth = depth
        self.known: list[Path] = []

    def scan(self) -> list[Path]:
        """Run directories found since the previous scan, sorted by path."""
        found: list[Path] = []

        def visit(directory: Path, level: int) -> None:
            if is_run_dir(directory):
                found.append(directory)
                return
            if level >= self.depth:
                return
            try:
                children = sorted(e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False))
            except OSError:
                return
            for child in children:
                visit(Path(child), level + 1)

        visit(self.root, 0)
        new = [p for p in found if p not in self.known]
        self.known.extend(new)
        return new
