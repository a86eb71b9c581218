"""Helpers for the live-dashboard tests: a server-sent-events reader with a deadline, a record writer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from distlearn.metrics import MetricRecord


class EventReader:
    """Reads ``(event, data)`` pairs from an open SSE response; every wait has a deadline."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()

    def next(self) -> tuple[str, Any]:
        name, data = "message", []
        for line in self.lines:
            if line == "":
                if data:
                    return name, json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        raise EOFError("the event stream ended")

    def until(self, predicate: Callable[[str, Any], bool], timeout: float = 20.0) -> list[tuple[str, Any]]:
        """Events read until (and including) the first one for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            event = self.next()
            seen.append(event)
            if predicate(*event):
                return seen
        raise AssertionError(f"no matching event within {timeout} s; saw {[name for name, _ in seen]}")


@contextmanager
def open_events(url: str, read_timeout: float = 10.0) -> Iterator[EventReader]:
    """An SSE connection whose every read fails after ``read_timeout`` seconds of silence."""
    timeout = httpx.Timeout(10.0, read=read_timeout)
    with httpx.Client(timeout=timeout) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventReader(response)


def train_record(step: int, **values: Any) -> MetricRecord:
    """A training record with plausible values that depend on the step (so tests can check them)."""
    defaults: dict[str, Any] = {
        "loss": 2.0 / (1 + step),
        "accuracy": min(1.0, 0.1 + step / 100),
        "samples_per_s": 1000.0 + step,
        "lr": 0.01,
        "bytes_sent": 1000 * step,
        "extra": {"comm_s": 0.03, "compute_s": 0.07},  # of the 0.1 s between two records
    }
    defaults.update(values)
    return MetricRecord(kind="train", step=step, epoch=step / 100, wall_time=0.1 * step, **defaults)
