"""The dashboard's server, run for real on 127.0.0.1 port 0: the page, the event stream, the toy view."""

from __future__ import annotations

import httpx
import pytest
from live_helpers import open_events, train_record

from distlearn.errors import ConfigError
from distlearn.live.server import HOST, LiveServer, static_dir
from distlearn.metrics import MetricRecord

pytestmark = pytest.mark.timeout(60)


def records_with(run_id: str, step: int):
    """A predicate: a ``records`` event of ``run_id`` holding a record of ``step``."""

    def predicate(name: str, data: dict) -> bool:
        return name == "records" and data["run"] == run_id and any(r["step"] == step for r in data["records"])

    return predicate


def test_the_stream_replays_each_run_reports_problems_and_follows_new_records(tmp_path, writer_factory):
    good, missing, bad = tmp_path / "good", tmp_path / "missing", tmp_path / "bad"
    writer = writer_factory(good)
    writer.write(train_record(5))
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(
        train_record(5).to_json() + "\n{not json\n" + train_record(10).to_json() + "\n"
    )

    with LiveServer([good, missing, bad], port=0, poll_interval=0.05) as server:
        assert server.port != 0 and server.url == f"http://{HOST}:{server.port}/"
        with open_events(server.url + "api/events") as events:
            name, hello = events.next()
            assert name == "hello" and hello["demo"] is False
            assert [(r["id"], r["label"]) for r in hello["runs"]] == [
                ("run0", "good"),
                ("run1", "missing"),
                ("run2", "bad"),
            ]
            seen = events.until(records_with("run2", 10))
            problems = [data for name, data in seen if name == "problem"]
            assert {(p["run"], p["level"]) for p in problems} == {("run1", "error"), ("run2", "error")}
            assert any("does not exist" in p["message"] for p in problems if p["run"] == "run1")
            assert any(f"{bad / 'metrics.jsonl'}:2" in p["message"] for p in problems if p["run"] == "run2")
            batches = [data["records"] for name, data in seen if name == "records" and data["run"] == "run2"]
            bad_steps = [record["step"] for batch in batches for record in batch]
            assert bad_steps == [5, 10]  # the line after the malformed one arrives too
            assert any(records_with("run0", 5)(n, d) for n, d in seen)

            # the runs keep streaming: a record written now arrives, and so does the run that appears
            writer.write(train_record(10))
            events.until(records_with("run0", 10))
            writer_factory(missing).write(train_record(7))
            seen = events.until(records_with("run1", 7))
            assert ("problem", "info") in [(n, d.get("level")) for n, d in seen]

        runs = httpx.get(server.url + "api/runs", timeout=10).json()
        assert [r["label"] for r in runs["runs"]] == ["good", "missing", "bad"]


def test_the_page_and_its_assets_are_served_from_the_package(tmp_path):
    assert (static_dir() / "vendor" / "uplot" / "uPlot.iife.min.js").is_file()
    with LiveServer([tmp_path], port=0) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script src="/static/vendor/uplot/uPlot.iife.min.js">' in page.text
        for asset in ("app.js", "style.css", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css"):
            response = client.get(f"/static/{asset}")
            assert response.status_code == 200, asset
            assert response.content == (static_dir() / asset).read_bytes()
        assert client.get("/static/nothing.js").status_code == 404


def test_discovery_adds_runs_that_appear_under_the_root(tmp_path, writer_factory):
    server = LiveServer(discover_root=tmp_path, port=0, poll_interval=0.05)
    with server, open_events(server.url + "api/events") as events:
        assert events.next()[1]["runs"] == []
        name, data = events.next()
        assert name == "problem" and data["level"] == "info" and "no runs under" in data["message"]
        writer_factory(tmp_path / "sync" / "seed0").write(train_record(3))
        seen = events.until(records_with("run0", 3))
        assert ("run", "sync/seed0") in [(n, d.get("label")) for n, d in seen]


def test_toy_view_streams_every_step_and_reports_bad_input(tmp_path):
    from distlearn.toy.problems import get_problem

    steps = 20
    with LiveServer([tmp_path], port=0) as server:
        options = httpx.get(server.url + "api/toy/options", timeout=30).json()
        assert "rosenbrock" in [p["name"] for p in options["problems"]]
        assert {"sgd", "adam"} <= set(options["optimizers"])

        surface = httpx.get(server.url + "api/toy/surface?function=beale", timeout=30).json()
        assert surface["window"] == list(get_problem("beale").window) and surface["lines"]
        assert len(surface["shading"]["values"]) == surface["shading"]["resolution"] ** 2
        assert httpx.get(server.url + "api/toy/surface?function=nope", timeout=30).status_code == 400

        query = f"api/toy/run?function=rosenbrock&optimizers=sgd,adam&steps={steps}&delay=0"
        with open_events(server.url + query, read_timeout=30) as events:
            seen = events.until(lambda name, _: name == "done", timeout=30)
        names = [name for name, _ in seen]
        assert names == ["start"] + ["step"] * (steps + 1) + ["done"]
        first, last = seen[1][1], seen[-2][1]
        start = list(get_problem("rosenbrock").start)
        assert first["t"] == 0 and first["points"] == {"sgd": start, "adam": start}
        assert last["t"] == steps
        assert seen[-1][1]["final"]["adam"]["loss"] == last["losses"]["adam"]

        bad_requests = {
            "steps=0": "steps must be between",
            "lr=fast": "not a number",
            "function=x": "unknown toy function",
        }
        for bad, fix in bad_requests.items():
            with open_events(server.url + f"api/toy/run?{bad}") as events:
                name, data = events.next()
                assert name == "problem" and fix in data["message"]
                with pytest.raises(EOFError):  # one problem, then the stream ends
                    events.next()


def test_a_taken_port_is_a_config_error_naming_the_fix(tmp_path):
    with LiveServer([tmp_path], port=0) as server, pytest.raises(ConfigError, match="pass another --port"):
        LiveServer([tmp_path], port=server.port)


def test_stop_ends_open_event_streams(tmp_path, writer_factory):
    writer_factory(tmp_path / "run").write(MetricRecord(kind="train", step=1, epoch=0, wall_time=0))
    server = LiveServer([tmp_path / "run"], port=0, poll_interval=0.05).start()
    try:
        with open_events(server.url + "api/events") as events:
            events.until(records_with("run0", 1))
            server.stop(timeout=10)  # raises if the open stream kept the server up
            with pytest.raises((EOFError, httpx.RemoteProtocolError)):
                while True:
                    events.next()
    finally:
        server.stop()


def test_an_event_is_its_name_line_its_compact_json_line_and_a_blank_line():
    from distlearn.live.sse import sse_message

    expected = 'event: step\ndata: {"t":3,"losses":[0.5,1]}\n\n'
    assert sse_message("step", {"t": 3, "losses": [0.5, 1]}) == expected
    with pytest.raises(ValueError):  # the browser's JSON.parse rejects NaN: never send it
        sse_message("records", {"loss": float("nan")})
