"""The layering of docs/architecture.md, checked on the source: no module imports a layer above its own.

Every ``import`` and ``from ... import`` of a distlearn module is counted, lazy ones inside functions too
(the same rule as ../shared/tools/import_cycles.py, which finds cycles; this test finds upward arrows,
which are how cycles start).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distlearn"

LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("optim", "comm", "data", "models", "metrics", "checkpoint", "config", "devices", "evaluation", "tables")
    + ("rundir", "amp"),
    ("launch", "lifeline", "pool", "ranklaunch", "agent_output"),
    ("parallel", "dni", "rl"),
    ("train",),
    ("bench", "live", "toy", "plot_cli", "async_momentum"),
    ("cli", "train_cli", "__main__"),
]
"""Lowest first; a module may import its own layer and the layers below it."""


def layer_of(module: str) -> int:
    """The layer of ``distlearn.<top>...`` (by its first name under distlearn)."""
    top = module.split(".")[1]
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module}: its package {top!r} is in no layer of LAYERS; add it")


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "distlearn":  # the package root only re-exports lazily (distlearn.parallelize)
            found.append((name, path))
    return found


def imported(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets |= {f"{source}.{alias.name}" for alias in node.names}
    return {t for t in targets if t.startswith("distlearn.") and _is_module(t)}


def _is_module(target: str) -> bool:
    """Whether ``distlearn.<top>`` is a module or package (not a name such as ``__version__``)."""
    top = target.split(".")[1]
    return (SRC / f"{top}.py").is_file() or (SRC / top / "__init__.py").is_file()


def test_every_package_has_a_layer():
    for name, _ in modules():
        layer_of(name)


@pytest.mark.parametrize("name, path", modules(), ids=[name for name, _ in modules()])
def test_no_module_imports_a_layer_above_its_own(name: str, path: Path):
    mine = layer_of(name)
    upward = sorted(t for t in imported(name, path) if layer_of(t) > mine)
    assert not upward, f"{name} (layer {mine}) imports {upward} from a layer above"


def test_the_check_sees_a_lazy_upward_import(tmp_path):
    """The test itself: a function-level import of the trainer from a strategy module is caught."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from distlearn.train import train\n    return train\n")
    assert imported("distlearn.parallel.bad", path) >= {"distlearn.train", "distlearn.train.train"}
    assert layer_of("distlearn.train.train") > layer_of("distlearn.parallel.bad")
