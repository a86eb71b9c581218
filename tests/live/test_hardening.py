"""The live page under hostile or careless clients: bounded work, Host and Origin checks, Ctrl-C, disconnects.

Each case is one that a fault run found on the page (issue 22, item 6): an unbounded optimizer list, a
Host header of another site (DNS rebinding), a POST from another origin, Ctrl-C while toy computations run,
and a client that connects and goes away (``curl`` of the event stream, a headless screenshot) ending the
demo's runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from live_helpers import open_events
from test_demo import ENDLESS, fashion_mnist_or_skip

from distlearn.errors import ConfigError
from distlearn.live import toy
from distlearn.live.demo import DemoBudget, DemoLauncher, _alive, descendants
from distlearn.live.server import LiveServer
from distlearn.toy.runner import optimizer_names

pytestmark = pytest.mark.timeout(120)


# -- bounded work per request ------------------------------------------------------------------------------


def test_the_optimizer_list_is_deduplicated_in_order():
    spec = toy.parse_run_request({"optimizers": ",".join(["sgd"] * 2000 + ["adam", "sgd"]), "steps": "10"})
    assert spec["optimizers"] == ["sgd", "adam"]


def test_optimizers_times_steps_is_capped_with_the_fix_in_the_message():
    everything = len(optimizer_names())
    with pytest.raises(ConfigError, match=r"more than the 20,000 optimizer steps.*at most \d+ steps"):
        toy.parse_run_request({"optimizers": "all", "steps": str(toy.MAX_STEPS)})
    allowed = toy.MAX_OPTIMIZER_STEPS // everything
    assert toy.parse_run_request({"optimizers": "all", "steps": str(allowed)})["steps"] == allowed
    with pytest.raises(ConfigError, match="optimizer list is too long"):
        toy.parse_run_request({"optimizers": "x" * 30_000})


def test_a_request_beyond_the_concurrent_limit_is_told_the_server_is_busy():
    spec = toy.parse_run_request({"optimizers": "sgd", "steps": "5"})
    stopping = __import__("threading").Event()
    held = [toy._running.acquire(blocking=False) for _ in range(toy.MAX_CONCURRENT_RUNS)]
    try:
        assert all(held)
        with pytest.raises(ConfigError, match="already computing 2 toy runs"):
            toy._compute(stopping, spec)
    finally:
        for _ in held:
            toy._running.release()
    assert len(toy._compute(stopping, spec)[0]["points"]) == 6  # free again: start and 5 steps


def test_a_computation_stops_at_the_stop_flag():
    stopping = __import__("threading").Event()
    stopping.set()
    spec = toy.parse_run_request({"optimizers": "sgd,adam", "steps": "5000"})
    started = time.monotonic()
    with pytest.raises(toy.Stopped):
        toy._compute(stopping, spec)
    assert time.monotonic() - started < 1.0


# -- Host and Origin ---------------------------------------------------------------------------------------


def test_a_host_header_of_another_site_is_refused(tmp_path):
    with LiveServer([tmp_path], port=0) as server:
        port = server.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            assert httpx.get(server.url + "api/runs", headers={"Host": host}, timeout=10).status_code == 200
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}"):
            response = httpx.get(server.url + "api/runs", headers={"Host": host}, timeout=10)
            assert response.status_code == 400, host
            assert str(tmp_path) not in response.text  # the run list (absolute paths) is not served


def test_a_post_from_another_origin_is_refused_before_any_route(tmp_path):
    with LiveServer([tmp_path], port=0) as server:
        runs = server.url + "api/runs"
        refused = httpx.post(runs, headers={"Origin": "http://attacker.example"}, timeout=10)
        assert refused.status_code == 403 and "attacker.example" in refused.text
        same = httpx.post(runs, headers={"Origin": f"http://127.0.0.1:{server.port}"}, timeout=10)
        assert same.status_code == 405  # the page's own origin reaches the routes (none takes a POST)
        assert httpx.get(runs, headers={"Origin": "http://attacker.example"}, timeout=10).status_code == 200


# -- disconnects never end a demo ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_curl_of_the_stream_and_a_screenshot_leave_the_demo_running(tmp_path):
    fashion_mnist_or_skip()
    launcher = DemoLauncher(tmp_path / "demo", ["single"], DemoBudget(**ENDLESS))
    server = LiveServer(demo=launcher, port=0, poll_interval=0.1)
    try:
        server.start()
        launcher.start()
        with open_events(server.url + "api/events", read_timeout=30) as events:  # as `curl` would
            events.until(lambda name, data: name == "records", timeout=90)
        chromium = os.environ.get("DISTLEARN_CHROMIUM") or shutil.which("chromium")
        if chromium is not None:  # a headless screenshot loads the page, runs its script and goes away
            subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                 f"--screenshot={tmp_path / 'shot.png'}", "--window-size=800,600", server.url],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        time.sleep(4)  # (the page used to end a demo 3 s after its closing message)
        assert [s["state"] for s in launcher.status()] == ["running"]
        assert not server.state.stopping.is_set()
    finally:
        launcher.stop(grace=2)
        server.stop()


# -- Ctrl-C while toy computations run ---------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_the_server_promptly_while_toy_runs_compute(tmp_path):
    cli = subprocess.Popen(
        [sys.executable, "-m", "distlearn", "live", "--root", str(tmp_path), "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    tree: list[int] = []
    clients: list[subprocess.Popen] = []
    try:
        line = cli.stdout.readline()
        while "open http" not in line:
            assert line, "distlearn live ended before it served"
            line = cli.stdout.readline()
        url = line.split("open ", 1)[1].split()[0]
        query = "api/toy/run?function=rosenbrock&optimizers=sgd,adam,cg-fr,adadelta&steps=5000&delay=0"
        for _ in range(8):  # two compute, the rest are told the server is busy
            clients.append(
                subprocess.Popen(
                    [sys.executable, "-c", f"import httpx; httpx.get({url + query!r}, timeout=60)"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(3)
        tree = descendants(cli.pid)
        started = time.monotonic()
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=30)
        elapsed = time.monotonic() - started
        assert cli.returncode == 130
        assert elapsed < 2.5, f"distlearn live took {elapsed:.1f} s to stop after Ctrl-C"
        assert [pid for pid in tree if _alive(pid)] == []
    finally:
        for client in clients:
            client.kill()
            client.wait()
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
