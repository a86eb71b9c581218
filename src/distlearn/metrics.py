"""What every run records: one JSON-lines file of :class:`MetricRecord` s, whatever the strategy.

Schema (version :data:`SCHEMA_VERSION`). Every line is one JSON object with these keys; a key whose value
is not known for that record is ``null``, never missing:

=================  =========  ===========================================================================
key                type       meaning
=================  =========  ===========================================================================
``schema``         int        schema version (1); readers reject versions they do not know
``kind``           str        ``"train"`` (every ``log_every`` steps), ``"eval"`` (test-set evaluation) or
                              ``"summary"`` (one, the last line of a finished run)
``run``            str        run name (the run directory's name unless given)
``step``           int        optimizer steps taken so far on this replica
``epoch``          float      fractional epochs done, ``step / steps_per_epoch``
``wall_time``      float      seconds since the run started (resumed runs continue the clock)
``loss``           float      train: mean training loss since the previous train record; eval: mean test loss
``accuracy``       float      train: training accuracy over the same window; eval: test accuracy, in [0, 1]
``samples_per_s``  float      training examples per second since the previous record (this replica);
                              summary: over the whole run
``lr``             float      learning rate of the first parameter group after this step
``rank``           int        process rank in the job (0 for a single process)
``world_size``     int        processes in the job
``role``           str        ``"worker"``, ``"server"``, ... (see :mod:`distlearn.parallel.base`)
``bytes_sent``     int        payload bytes this process has sent so far (null if it does not communicate)
``staleness``      float      mean gradient staleness over the window, in parameter versions (async only)
``extra``          object     free-form additions (summary: dataset, model, optimizer, best accuracy, ...;
                             train: ``comm_s``, seconds of the window this rank was blocked in the
                             strategy's step hooks -- waiting for communication not hidden behind
                             backward -- and ``compute_s``, the rest of the window)
=================  =========  ===========================================================================

:class:`MetricsWriter` writes the file (line-buffered, so a crashed run keeps every line it wrote) and, when
the ``tensorboard`` package is installed and asked for, the same scalars as TensorBoard events.
:func:`read_metrics` reads it back and :func:`load_runs` reads several runs for ``distlearn plot``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from distlearn.errors import ConfigError, DataError

__all__ = [
    "METRICS_FILE",
    "SCHEMA_VERSION",
    "MetricRecord",
    "MetricsWriter",
    "cut_metrics",
    "load_runs",
    "metrics_files",
    "read_metrics",
    "read_run",
    "tensorboard_available",
]

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.jsonl"
"""File name of the metrics inside a run directory."""

Kind = Literal["train", "eval", "summary"]


@dataclass
class MetricRecord:
    """One line of a metrics file; see the module docstring for the meaning and unit of each field."""

    kind: Kind
    step: int
    epoch: float
    wall_time: float
    run: str = ""
    loss: float | None = None
    accuracy: float | None = None
    samples_per_s: float | None = None
    lr: float | None = None
    rank: int = 0
    world_size: int = 1
    role: str = "worker"
    bytes_sent: int | None = None
    staleness: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        values = asdict(self)
        for key, value in values.items():  # JSON has no NaN/inf: store them as null
            if isinstance(value, float) and not math.isfinite(value):
                values[key] = None
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "record") -> MetricRecord:
        version = values.get("schema")
        if version != SCHEMA_VERSION:
            raise DataError(
                f"{source}: metrics schema version {version!r} is not {SCHEMA_VERSION}; "
                "read it with the distlearn version that wrote it"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in ("kind", "step", "epoch", "wall_time") if n not in values)
        if missing:
            raise DataError(f"{source}: metrics record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in values.items() if k in names})


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package is installed)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsWriter:
    """Appends :class:`MetricRecord` s to ``run_dir/metrics.jsonl`` (and TensorBoard events if asked).

    Args:
        run_dir: directory of the run; created if needed.
        run: run name written into every record (default: the directory's name).
        rank, world_size, role: this process's place in the job, copied into every record.
        tensorboard: ``"auto"`` writes events under ``run_dir/tensorboard`` when the package is installed,
            ``"on"`` requires it, ``"off"`` never writes them.
        append: continue an existing file (resumed runs) instead of starting a new one.
        cut_after: with ``append``, first drop the file's records after this step and every summary
            record (a resumed run continues from its checkpoint's step: one curve, no duplicates).
        filename: the JSON-lines file inside ``run_dir``; ranks other than 0 default to
            ``metrics.rank<k>.jsonl`` so processes never interleave lines (the trainer names the file of
            the process that does the job's I/O ``metrics.jsonl`` whatever its rank, e.g. a parameter
            server's first worker).
        extra_scalars: keys of ``record.extra`` also written to TensorBoard when numeric (RL runs:
            ``episode_return``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        run: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        role: str = "worker",
        tensorboard: Literal["auto", "on", "off"] = "auto",
        append: bool = False,
        cut_after: int | None = None,
        filename: str | None = None,
        extra_scalars: tuple[str, ...] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.extra_scalars = extra_scalars
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = run or self.run_dir.resolve().name
        self.rank, self.world_size, self.role = rank, world_size, role
        name = filename or (METRICS_FILE if rank == 0 else f"metrics.rank{rank}.jsonl")
        self.path = self.run_dir / name
        if append and cut_after is not None:
            cut_metrics(self.path, cut_after)
        self._file = open(self.path, "a" if append else "w", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._tensorboard = None
        if tensorboard == "on" and not tensorboard_available():
            raise ConfigError(
                "--tensorboard on needs the tensorboard package: pip install 'distlearn[tensorboard]'"
            )
        if tensorboard != "off" and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard" / f"rank{rank}"))

    def write(self, record: MetricRecord) -> None:
        """Append one record (run, rank, world size and role are filled in)."""
        record.run, record.rank, record.world_size, record.role = (
            self.run,
            self.rank,
            self.world_size,
            self.role,
        )
        self._file.write(record.to_json() + "\n")
        if self._tensorboard is not None and record.kind != "summary":
            scalars = [
                (key, getattr(record, key))
                for key in ("loss", "accuracy", "samples_per_s", "lr", "bytes_sent", "staleness")
            ]
            scalars += [(key, record.extra.get(key)) for key in self.extra_scalars]
            for key, value in scalars:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(
                        f"{record.kind}/{key}", value, record.step, walltime=time.time()
                    )

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_metrics(path: str | Path, step: int) -> int:
    """Drop the records of ``path`` after ``step`` and every summary; returns how many were dropped.

    Used when a run resumes from its checkpoint at ``step``: the killed run's records past the checkpoint
    would otherwise stay beside the resumed run's records for the same steps. The file is rewritten
    atomically (a temporary file beside it, then ``os.replace``); a missing file is left missing, and a
    last line cut short by a crash is dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            values = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut short by the kill
            continue
        if values.get("kind") == "summary" or values.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)
    return dropped


_RANK_FILE = re.compile(r"metrics\.rank(\d+)\.jsonl")


def metrics_files(run_dir: str | Path) -> list[Path]:
    """The metrics files of a run directory: ``metrics.jsonl`` first, then ``metrics.rank<k>.jsonl`` by k
    ([] when the directory cannot be listed)."""
    run_dir = Path(run_dir)
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    ranked = sorted((int(m.group(1)), name) for name in names if (m := _RANK_FILE.fullmatch(name)))
    files = [run_dir / METRICS_FILE] if METRICS_FILE in names else []
    return files + [run_dir / name for _, name in ranked]


def read_run(path: str | Path) -> list[MetricRecord]:
    """The records of a run: a metrics file, or a run directory whatever its strategy.

    A directory's records are those of ``metrics.jsonl`` or, in a run written before every strategy named
    its I/O process's file so, of the lowest rank's ``metrics.rank<k>.jsonl``. When that file holds no
    train records (DNI: rank 0 evaluates, the top stage trains), the train records of the first other
    rank file that has some are added.
    """
    path = Path(path)
    if not path.is_dir():
        return read_metrics(path)
    files = metrics_files(path)
    if not files:
        raise DataError(
            f"no metrics file in {path} (metrics.jsonl or metrics.rank<k>.jsonl); "
            "pass a run directory written by `distlearn train`"
        )
    records = read_metrics(files[0])
    if not any(r.kind == "train" for r in records):
        for other in files[1:]:
            train = [r for r in read_metrics(other) if r.kind == "train"]
            if train:
                records = train + records
                break
    return records


def read_metrics(path: str | Path) -> list[MetricRecord]:
    """Read a metrics file (or a run directory holding ``metrics.jsonl``) back into records.

    A last line cut short by a crash is skipped; any other malformed line is an error naming the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"no metrics file at {path}; pass a run directory written by `distlearn train`")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # a run killed mid-write
                break
            raise DataError(f"{path}:{number}: not a JSON object ({error})") from error
        records.append(MetricRecord.from_dict(values, source=f"{path}:{number}"))
    return records


def load_runs(paths: list[str | Path]) -> dict[str, list[MetricRecord]]:
    """Records of several runs keyed by a unique label (the run name, or the path when names clash)."""
    runs: dict[str, list[MetricRecord]] = {}
    for path in paths:
        records = read_run(path)
        label = records[0].run if records and records[0].run else Path(path).name
        if label in runs:
            label = str(path)
        runs[label] = records
    return runs
