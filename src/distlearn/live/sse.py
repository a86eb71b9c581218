"""Server-sent events (the HTML standard's ``text/event-stream``), as the dashboard's streams write them.

One message is an ``event: NAME`` line, a ``data: JSON`` line and a blank line; the page's ``EventSource``
dispatches it to the listener for ``NAME``. The JSON is compact and strict (no NaN or infinity, which
``JSON.parse`` in the browser rejects). Both the run streams (:mod:`distlearn.live.server`) and the toy view
(:mod:`distlearn.live.toy`) write their messages with :func:`sse_message`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["sse_message"]


def sse_message(event: str, data: Any) -> str:
    """One server-sent event: ``event: NAME`` and ``data: JSON`` lines and a blank line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"
