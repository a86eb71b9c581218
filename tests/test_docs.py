"""Docs that quote code stay equal to that code."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_architecture_page_shows_the_example_strategy_as_it_is_in_the_tests():
    page = (REPO / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    example = (REPO / "tests" / "parallel" / "example_strategy.py").read_text()
    assert example in blocks, "docs/architecture.md must quote tests/parallel/example_strategy.py verbatim"
    assert len(example.splitlines()) < 150  # the bound on an example strategy file
