"""Markdown tables drawn by rich, read back by a Markdown parser (markdown-it, GitHub's table rules)."""

from __future__ import annotations

import pytest
from markdown_it import MarkdownIt

from distlearn.tables import markdown_table


def parse(text: str) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """The header cells with their alignment, and the body rows, as a GFM renderer reads them."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    header: list[tuple[str, str]] = []
    rows: list[list[str]] = []
    in_head = False
    for i, token in enumerate(tokens):
        if token.type == "thead_open":
            in_head = True
        elif token.type == "thead_close":
            in_head = False
        elif token.type == "tr_open" and not in_head:
            rows.append([])
        elif token.type in ("th_open", "td_open"):
            content = tokens[i + 1].content if tokens[i + 1].type == "inline" else ""
            if in_head:
                style = str(token.attrs.get("style", ""))
                header.append((content, style.removeprefix("text-align:") or "left"))
            else:
                rows[-1].append(content)
    return header, rows


def test_a_table_reads_back_cell_for_cell_with_its_alignment():
    rows = [["sync, ring", 91.0, "1,234"], ["a|b", "[bold]x[/]", ""], ["short"]]
    text = markdown_table(["strategy", "acc. (%)", "samples/s"], rows, align="lcr")
    header, body = parse(text)
    assert header == [("strategy", "left"), ("acc. (%)", "center"), ("samples/s", "right")]
    # the pipe is escaped, markup is not read, the short row's last cells are empty
    assert body == [["sync, ring", "91.0", "1,234"], ["a|b", "[bold]x[/]", ""], ["short", "", ""]]
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # padded to one width: reads as text too
    assert lines[1] == "|------------|:----------:|----------:|"


def test_a_line_break_in_a_cell_stays_in_its_row_and_no_rows_is_a_header_only():
    assert parse(markdown_table(["a", "b"], [["one\ntwo", 2]]))[1] == [["one two", "2"]]
    assert markdown_table(["a", "b"], [], align="r") == "| a | b |\n|--:|---|"


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table([], [])
    with pytest.raises(ValueError, match="one of l, r, c"):
        markdown_table(["a"], [], align="x")
    with pytest.raises(ValueError, match="row 0 has 2 cells for 1 columns"):
        markdown_table(["a"], [[1, 2]])
