"""The live dashboard: ``distlearn live`` serves a page on 127.0.0.1 that shows runs as they train.

Modules: :mod:`~distlearn.live.tail` (follow metrics files as they grow), :mod:`~distlearn.live.server`
(the Starlette app and its uvicorn server, server-sent events), :mod:`~distlearn.live.toy` (the toy-problem
view), :mod:`~distlearn.live.demo` (``--demo``: every strategy side by side) and :mod:`~distlearn.live.cli`.
The page (``static/``) draws its charts with uPlot, vendored from the npm registry, so it needs no internet.
See docs/live.md.
"""

from __future__ import annotations

__all__ = ["LiveServer"]


def __getattr__(name: str) -> object:
    if name == "LiveServer":  # imported on use: starlette and uvicorn are only needed by the dashboard
        from distlearn.live.server import LiveServer

        return LiveServer
    raise AttributeError(name)
