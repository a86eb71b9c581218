"""GitHub-flavoured Markdown tables, drawn by rich (``box.MARKDOWN``) rather than joined by hand.

:func:`markdown_table` is what every report that prints or writes a Markdown table uses (``distlearn
bench``'s results and projections, the toy problems' docs table, the scripts under ``benchmarks/``).
Columns are padded to one width, so the table also reads as text in a terminal or a log; a ``|`` in a cell
is escaped and a line break becomes a space, so a cell cannot split its row. Rich draws the delimiter row
without alignment marks; this module adds GitHub's ``---:`` (right) and ``:---:`` (centre) there.

Example::

    >>> print(markdown_table(["strategy", "samples/s"], [["sync", "1,234"]], align="lr"))
    | strategy | samples/s |
    |----------|----------:|
    | sync     |     1,234 |
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["markdown_table"]

_JUSTIFY = {"l": "left", "r": "right", "c": "center"}
_WIDTH = 1 << 16
"""The console's width: wide enough that rich never wraps or cuts a cell."""


def _cell(value: object) -> Text:
    text = str(value).replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")
    return Text(text)  # a Text, so rich reads no markup ("[bold]") in it


def _delimiter(segment: str, align: str) -> str:
    if align == "r":
        return segment[:-1] + ":"
    if align == "c":
        return ":" + segment[1:-1] + ":"
    return segment


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table of ``header`` and ``rows`` (any values, written with ``str``), no final newline.

    ``align`` has one letter per column, ``l`` (left, the default), ``r`` or ``c``; a shorter string leaves
    the remaining columns left-aligned. A row may be shorter than the header (its last cells are empty)
    but not longer.
    """
    if not header:
        raise ValueError("a Markdown table needs at least one column")
    if len(align) > len(header) or set(align) - set(_JUSTIFY):
        raise ValueError(f"align {align!r}: one of l, r, c per column ({len(header)} columns)")
    align = align.ljust(len(header), "l")
    table = Table(box=box.MARKDOWN, header_style=None, show_edge=True, pad_edge=True)
    for name, letter in zip(header, align, strict=True):
        table.add_column(_cell(name), justify=_JUSTIFY[letter], min_width=1, no_wrap=True)
    for number, row in enumerate(rows):
        if len(row) > len(header):
            raise ValueError(f"row {number} has {len(row)} cells for {len(header)} columns: {list(row)!r}")
        table.add_row(*(_cell(value) for value in row), *([Text("")] * (len(header) - len(row))))
    console = Console(
        file=io.StringIO(), width=_WIDTH, color_system=None, markup=False, highlight=False, emoji=False
    )
    console.print(table, crop=False)
    lines = [line.rstrip() for line in console.file.getvalue().splitlines() if line.strip()]
    segments = lines[1].split("|")[1:-1]
    lines[1] = "|" + "|".join(_delimiter(s, a) for s, a in zip(segments, align, strict=True)) + "|"
    return "\n".join(lines)
