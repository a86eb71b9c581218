"""The metrics tailer: complete lines only; bad lines and missing runs are problems; the rest streams on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from live_helpers import train_record

from distlearn.live.tail import FileTail, RunDiscovery, RunTail, parse_record
from distlearn.metrics import MetricRecord

pytestmark = pytest.mark.timeout(30)


def events_of(events: list[dict], kind: str) -> list[dict]:
    return [event for event in events if event["type"] == kind]


def steps_of(events: list[dict]) -> list[int]:
    return [record["step"] for event in events_of(events, "records") for record in event["records"]]


def test_file_tail_hands_over_a_line_only_once_its_newline_arrives(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b":')
    tail = FileTail(path)
    assert tail.read() == [(1, b'{"a": 1}')]
    assert tail.read() == []  # the half line waits
    with open(path, "ab") as handle:
        handle.write(b' 2}\n\n{"c": 3}\n')
    # the blank line 3 is counted but not handed over
    assert tail.read() == [(2, b'{"b": 2}'), (4, b'{"c": 3}')]
    assert not tail.restarted


def test_file_tail_starts_over_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"one\ntwo\nthree\n")
    tail = FileTail(path)
    assert [n for n, _ in tail.read()] == [1, 2, 3]
    path.write_bytes(b"new\n")
    assert tail.read() == [(1, b"new")]
    assert tail.restarted


def test_a_malformed_line_is_a_problem_and_the_following_lines_still_stream(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    header = {"kind": "train", "epoch": 0, "wall_time": 0}
    lines = [
        train_record(5).to_json(),
        "this is not json",
        "[1, 2, 3]",
        json.dumps({"schema": 99, "step": 1, **header}),
        json.dumps({"schema": 1, "step": "ten", **header}),
        train_record(10).to_json(),
    ]
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n")
    tail = RunTail("run0", run_dir)

    with caplog.at_level("WARNING", logger="distlearn.live"):
        events = tail.poll()

    problems = events_of(events, "problem")
    assert [p["level"] for p in problems] == ["error"] * 4
    # each names the file and line, and what is wrong
    assert f"{run_dir / 'metrics.jsonl'}:2: not a JSON object" in problems[0]["message"]
    assert ":3: not a JSON object (a list)" in problems[1]["message"]
    assert ":4: metrics schema version 99" in problems[2]["message"]
    assert ":5: step must be an integer" in problems[3]["message"]
    assert steps_of(events) == [5, 10]  # the good lines on both sides of the bad ones
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 4

    with open(metrics, "a", encoding="utf-8") as handle:
        handle.write(train_record(15).to_json() + "\n")
    later = tail.poll()
    assert steps_of(later) == [15]
    assert events_of(later, "problem") == []  # each bad line is reported once


def test_non_finite_numbers_read_as_null(tmp_path: Path) -> None:
    line = b'{"schema": 1, "kind": "train", "step": 1, "epoch": 0.5, "wall_time": 1.0, "loss": NaN}'
    assert parse_record(line, "x:1")["loss"] is None


def test_a_missing_run_directory_is_reported_once_then_followed_when_it_appears(tmp_path, writer_factory):
    run_dir = tmp_path / "not-yet"
    tail = RunTail("run0", run_dir)
    first = tail.poll()
    assert len(first) == 1 and first[0]["type"] == "problem" and first[0]["level"] == "error"
    assert f"run directory {run_dir} does not exist" in first[0]["message"]
    assert tail.poll() == []  # not repeated every poll

    writer = writer_factory(run_dir)
    writer.write(train_record(1))
    appeared = tail.poll()
    assert [e["type"] for e in appeared] == ["problem", "records"]
    assert appeared[0]["level"] == "info" and "appeared" in appeared[0]["message"]
    assert steps_of(appeared) == [1]


def test_every_rank_file_is_followed_and_a_rewrite_resets_it(tmp_path, writer_factory):
    run_dir = tmp_path / "run"
    rank0 = writer_factory(run_dir, rank=0, world_size=2)
    rank1 = writer_factory(run_dir, rank=1, world_size=2)
    rank0.write(train_record(5))
    rank1.write(train_record(5, bytes_sent=123))
    tail = RunTail("run0", run_dir)
    records = events_of(tail.poll(), "records")[0]["records"]
    assert [(r["rank"], r["file"]) for r in records] == [(0, "metrics.jsonl"), (1, "metrics.rank1.jsonl")]
    assert records[1]["bytes_sent"] == 123

    rank1.close()
    rewritten = MetricRecord(kind="eval", step=1, epoch=0, wall_time=0, rank=1)
    (run_dir / "metrics.rank1.jsonl").write_text(rewritten.to_json() + "\n")
    events = tail.poll()
    reset = {"type": "reset", "run": "run0", "file": "metrics.rank1.jsonl", "rank": 1}
    assert events_of(events, "reset") == [reset]
    assert [r["kind"] for r in events_of(events, "records")[0]["records"]] == ["eval"]


def test_parameter_server_reports_become_a_staleness_histogram(tmp_path, writer_factory):
    run_dir = tmp_path / "ps"
    writer_factory(run_dir).write(train_record(1))
    # ps-server<k>.json: each update is [worker, version, staleness] (distlearn.parallel.ps)
    (run_dir / "ps-server0.json").write_text(json.dumps({"updates": [[1, 0, 0], [2, 1, 1], [1, 2, 1]]}))
    (run_dir / "ps-server1.json").write_text(json.dumps({"updates": [[1, 0, 3]]}))
    tail = RunTail("run0", run_dir)
    staleness = events_of(tail.poll(), "staleness")
    assert staleness[0]["counts"] == {"0": 1, "1": 2, "3": 1}
    assert events_of(tail.poll(), "staleness") == []  # sent again only when a report changes

    (run_dir / "ps-server1.json").write_text("{broken")
    os.utime(run_dir / "ps-server1.json", (1, 1))
    events = tail.poll()
    assert "could not read the staleness" in events_of(events, "problem")[0]["message"]
    assert events_of(events, "staleness")[0]["counts"] == {"0": 1, "1": 2}


def test_discovery_finds_run_directories_as_they_appear(tmp_path, writer_factory):
    discovery = RunDiscovery(tmp_path)
    assert discovery.scan() == []
    writer_factory(tmp_path / "group" / "a").write(train_record(1))
    (tmp_path / "empty").mkdir()
    assert discovery.scan() == [tmp_path / "group" / "a"]
    writer_factory(tmp_path / "b").write(train_record(1))
    assert discovery.scan() == [tmp_path / "b"]  # only the new one
