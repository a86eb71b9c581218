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


def test_the_library_page_names_every_option_of_every_strategy_a_loop_can_use():
    import dataclasses

    from distlearn.parallel import strategy_class

    page = (REPO / "docs" / "library.md").read_text()
    for name in ("sync", "ps", "local-sgd", "easgd", "ddp", "single", "hogwild", "dni"):
        assert f"`{name}`" in page, f"docs/library.md does not name the strategy {name}"
    for name in ("sync", "ps", "local-sgd", "easgd", "ddp"):
        for field in dataclasses.fields(strategy_class(name).Options):
            assert f"`{field.name}" in page, f"docs/library.md does not name {name}'s option {field.name}"
    for example in sorted((REPO / "examples").glob("*.py")):
        assert f"examples/{example.name}" in page, f"docs/library.md does not list {example.name}"
