"""The live dashboard's web server: a Starlette app on uvicorn, on 127.0.0.1, streaming server-sent events.

Routes:

* ``/``: the page (``static/index.html``) and ``/static/...`` its scripts, styles and the vendored uPlot;
* ``/api/events``: the runs' metrics as server-sent events. Each connection replays every run from its
  first line, then follows the files as they grow (see :mod:`distlearn.live.tail`), woken by watchfiles when
  they change (see :mod:`distlearn.live.watch`). Event names are the
  ``type`` of each event: ``hello`` (the run list and whether a demo is running), ``run`` (a run to show),
  ``records``, ``reset``, ``problem``, ``staleness``, ``process`` (a demo process started or ended), and a
  comment line every 15 s to keep the connection open;
* ``/api/runs``: the same run list as JSON;
* ``/api/toy/...``: the toy-problem view (:mod:`distlearn.live.toy`).

Every request must name this server in its ``Host`` header (``127.0.0.1`` or ``localhost``:
Starlette's ``TrustedHostMiddleware``), so a page of another site that rebinds its DNS name to 127.0.0.1
cannot read the run list; a request that changes state (POST) must come from the page itself: its
``Origin``, when present, is this server's (``403`` otherwise).

A malformed line or a missing run directory becomes a ``problem`` event (shown on the page) and a warning in
the log; every other run keeps streaming. :class:`LiveServer` runs the app in a background thread (for
tests and for the CLI's demo): it binds its socket first, so port 0 means "any free port" and
:attr:`LiveServer.url` is known before the first request.

Example::

    with LiveServer(["runs/sync", "runs/ps"]) as server:
        print("open", server.url)
        server.wait()          # until Ctrl-C
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from distlearn.errors import ConfigError
from distlearn.live.sse import sse_message
from distlearn.live.tail import Event, RunDiscovery, RunTail
from distlearn.live.toy import preload, toy_routes
from distlearn.live.watch import ChangeWatch

if TYPE_CHECKING:
    from distlearn.live.demo import DemoLauncher

__all__ = ["HOST", "LiveServer", "LiveState", "RunInfo", "create_app", "static_dir"]

log = logging.getLogger("distlearn.live")

HOST = "127.0.0.1"
"""The dashboard only ever listens on the loopback interface."""

HOST_NAMES = ("127.0.0.1", "localhost")
"""The names a request's ``Host`` header may give (with any port): the loopback interface's."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

KEEPALIVE_SECONDS = 15.0
DISCOVERY_SECONDS = 1.0
WAKE_SECONDS = 1.0
"""The longest an event stream waits for a file change before it reads, discovers and checks anyway."""


def static_dir() -> Path:
    """The directory of the page's files, shipped inside the package."""
    return Path(str(resources.files("distlearn.live") / "static"))


@dataclass
class RunInfo:
    """A run the page shows: a stable id, a label for the legend and the directory (or file) it reads."""

    id: str
    label: str
    path: Path

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "path": str(self.path)}


@dataclass
class LiveState:
    """What every connection shares: the runs (given, discovered, or the demo's), clients, stopping."""

    run_paths: Sequence[str | Path] = ()
    discover_root: Path | None = None
    demo: DemoLauncher | None = None
    poll_interval: float = 0.25
    """Seconds over which file changes are gathered before the streams read them (see ChangeWatch)."""
    runs: list[RunInfo] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    clients: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._discovery = RunDiscovery(self.discover_root) if self.discover_root is not None else None
        self._last_scan = -float("inf")
        for path in self.run_paths:
            self._add(Path(path))
        if self.demo is not None:
            for name, path in self.demo.runs():
                self._add(path, label=name)

    def _add(self, path: Path, label: str | None = None) -> None:
        labels = {run.label for run in self.runs}
        if label is None:
            label = path.name or str(path)
            if self.discover_root is not None:
                with contextlib.suppress(ValueError):
                    label = str(path.relative_to(self.discover_root))
        if label in labels:
            label = str(path)
        self.runs.append(RunInfo(id=f"run{len(self.runs)}", label=label, path=path))

    def current_runs(self) -> list[RunInfo]:
        """Every run so far; with a discovery root, new run directories are added (at most once a second)."""
        with self._lock:
            now = time.monotonic()
            if self._discovery is not None and now - self._last_scan >= DISCOVERY_SECONDS:
                self._last_scan = now
                for path in self._discovery.scan():
                    if all(run.path != path for run in self.runs):
                        self._add(path)
            return list(self.runs)

    def client_connected(self) -> None:
        with self._lock:
            self.clients += 1

    def client_disconnected(self) -> None:
        with self._lock:
            self.clients -= 1



def _poll_all(tails: list[RunTail]) -> list[Event]:
    events: list[Event] = []
    for tail in tails:
        events.extend(tail.poll())
    return events


async def _events(request: Request) -> Response:
    state: LiveState = request.app.state.live

    async def stream() -> AsyncIterator[str]:
        state.client_connected()
        watch = ChangeWatch(latency=state.poll_interval, timeout=WAKE_SECONDS, stop=state.stopping)
        try:
            tails: dict[str, RunTail] = {}
            runs = state.current_runs()
            yield sse_message(
                "hello",
                {
                    "type": "hello",
                    "runs": [run.describe() for run in runs],
                    "demo": state.demo is not None,
                    "discover_root": str(state.discover_root) if state.discover_root else None,
                },
            )
            if not runs and state.discover_root is not None:
                message = (
                    f"no runs under {state.discover_root} yet; start one with "
                    f"`distlearn train --out {state.discover_root}/NAME` and it appears here"
                )
                yield sse_message(
                    "problem", {"type": "problem", "run": None, "level": "info", "message": message}
                )
            processes: dict[str, dict[str, Any]] = {}
            last_sent = time.monotonic()
            while not state.stopping.is_set():
                runs = state.current_runs()
                for run in runs:
                    if run.id not in tails:
                        tails[run.id] = RunTail(run.id, run.path)
                        yield sse_message("run", {"type": "run", **run.describe()})
                events = await anyio.to_thread.run_sync(_poll_all, list(tails.values()))
                if state.demo is not None:
                    ids = {run.label: run.id for run in state.runs}
                    for status in state.demo.status():
                        if processes.get(status["label"]) != status:
                            processes[status["label"]] = status
                            events.append({"type": "process", "run": ids.get(status["label"]), **status})
                for event in events:
                    yield sse_message(event["type"], event)
                now = time.monotonic()
                if events:
                    last_sent = now
                elif now - last_sent >= KEEPALIVE_SECONDS:
                    last_sent = now
                    yield ": keep-alive\n\n"
                watched = [run.path for run in runs]
                if state.discover_root is not None:
                    watched.append(state.discover_root)
                await watch.wait(watched)
        finally:
            await watch.aclose()
            state.client_disconnected()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _runs(request: Request) -> Response:
    state: LiveState = request.app.state.live
    body: dict[str, Any] = {"runs": [run.describe() for run in state.current_runs()]}
    if state.demo is not None:
        body["processes"] = state.demo.status()
    return JSONResponse(body)


async def _index(request: Request) -> Response:
    return FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})


class SameOriginWrites:
    """ASGI middleware: a request that is not a GET/HEAD/OPTIONS must come from this server's own page.

    Browsers send ``Origin`` with every cross-site POST (``fetch``, forms, ``sendBeacon``), so a request
    whose ``Origin`` names another site is refused with 403 before it reaches a route; a request without
    ``Origin`` (``curl``, a script on this machine) is let through, as the page itself is on 127.0.0.1.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin and origin != f"http://{host}":
                response = Response(
                    f"refused: a {scope['method']} from {origin} (this page is http://{host})\n",
                    status_code=403,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: LiveState) -> Starlette:
    """The Starlette application serving the page, the event streams and the toy view for ``state``."""

    app = Starlette(
        routes=[
            Route("/", _index),
            Route("/api/events", _events),
            Route("/api/runs", _runs),
            *toy_routes(),
            Mount("/static", app=StaticFiles(directory=static_dir()), name="static"),
        ],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=list(HOST_NAMES)),
            Middleware(SameOriginWrites),
        ],
    )
    app.state.live = state
    return app


class _Server(uvicorn.Server):
    """uvicorn's server that also ends the event streams when it is asked to exit (Ctrl-C included)."""

    def __init__(self, config: uvicorn.Config, state: LiveState) -> None:
        super().__init__(config)
        self.live_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.live_state.stopping.set()
        super().handle_exit(sig, frame)


def _bind(port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"port {port} is out of range; pass --port between 1 and 65535, or 0 for any free port"
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot listen on {HOST}:{port} ({error.strerror}); "
            "pass another --port, or --port 0 for any free one"
        ) from error
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


class LiveServer:
    """The dashboard on ``127.0.0.1:port`` (port 0: any free port), served by uvicorn.

    Args:
        run_paths: run directories (or metrics files) to show; missing ones are reported on the page.
        port: TCP port; 0 picks a free one (see :attr:`url`).
        discover_root: also show every run directory that appears under this directory.
        demo: a :class:`distlearn.live.demo.DemoLauncher` whose runs are shown (the command stops them
            with the server; closing the page does not: a client going away never ends a demo).
        poll_interval: seconds over which changes of the metrics files are gathered before they are read
            (the page lags a write by about this); without a change they are read every second.

    :meth:`start` serves in a background thread; :meth:`serve` in the calling thread (handles Ctrl-C).
    """

    def __init__(
        self,
        run_paths: Sequence[str | Path] = (),
        *,
        port: int = 0,
        discover_root: str | Path | None = None,
        demo: DemoLauncher | None = None,
        poll_interval: float = 0.25,
    ) -> None:
        if poll_interval <= 0:
            raise ConfigError(f"poll interval must be positive, got {poll_interval}; try 0.25")
        self.state = LiveState(
            run_paths=run_paths,
            discover_root=Path(discover_root) if discover_root is not None else None,
            demo=demo,
            poll_interval=poll_interval,
        )
        self.app = create_app(self.state)
        preload()  # the toy view's modules, before the first request (not inside one, on the event loop)
        self.socket = _bind(port)
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            timeout_graceful_shutdown=1,  # streams end within a tick of the stop flag; Ctrl-C in <= 2 s
        )
        self.server = _Server(config, self.state)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def _request_exit(self) -> None:
        self.state.stopping.set()
        self.server.should_exit = True

    def serve(self) -> None:
        """Serve in this thread until Ctrl-C or :meth:`stop`."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.state.stopping.set()
            self.socket.close()

    def start(self, timeout: float = 30.0) -> LiveServer:
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve, name="distlearn-live", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the live server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server thread ends (True) or ``timeout`` passes (False)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread (event streams end within 50 ms)."""
        self._request_exit()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the live server did not stop within {timeout} s")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
