"""Packaging: the core installs only what parallelize() and train need; every extra is imported lazily;
`make` (the dev extra) installs every package the tests import.

A subprocess refuses every optional package (a sys.meta_path finder), as on a machine where only
``pip install distlearn`` ran, and shows that the library and the trainer still import, and that a command
needing an extra says which one to install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("starlette", "uvicorn", "anyio", "gymnasium", "matplotlib", "PIL", "tensorboard", "ale_py",
            "minatar", "contourpy", "psutil", "watchfiles")  # fmt: skip

_REFUSE = f"""
import sys
OPTIONAL = {OPTIONAL!r}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)", name=name)
        return None
sys.meta_path.insert(0, Refuse())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _REFUSE + code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )


def test_core_imports_without_any_optional_package():
    result = _run(
        "import distlearn, distlearn.train, distlearn.parallel.api, distlearn.train_cli\n"
        "assert callable(distlearn.parallelize)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in OPTIONAL)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_command_needing_an_extra_names_it():
    result = _run("from distlearn.cli import main\nsys.exit(main(['live', '--port', '0']))\n")
    assert result.returncode == 2, result.stderr
    assert "pip install 'distlearn[live]'" in result.stderr
    result = _run(
        "from distlearn.errors import ConfigError\n"
        "from distlearn.rl.envs import make_env\n"
        "try:\n    make_env('CartPole-v1', 0)\nexcept ConfigError as error:\n    print(error)\n"
    )
    assert "pip install 'distlearn[rl]'" in result.stdout, result.stderr


def test_plot_and_rl_name_their_extra_on_the_command_line(tmp_path):
    for command, extra in ((["plot", str(tmp_path), "--out", str(tmp_path / "c.png")], "plot"),
                           (["rl", "a3c", "--env", "CartPole-v1"], "rl")):  # fmt: skip
        result = _run(f"from distlearn.cli import main\nsys.exit(main({command!r}))\n")
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"pip install 'distlearn[{extra}]'" in result.stderr, result.stderr


def test_core_dependencies_are_the_small_set():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {spec.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip() for spec in
             project["dependencies"]}  # fmt: skip
    assert names == {"torch", "numpy", "rich", "tyro", "tomli"}
    extras = project["optional-dependencies"]
    assert {"live", "rl", "atari", "plot", "tensorboard", "dev"} <= set(extras)
    assert project["license"] == "MIT" and (ROOT / "LICENSE").is_file()
    dev = " ".join(extras["dev"])
    for extra in ("live", "rl", "atari", "plot", "tensorboard"):
        assert extra in dev.split("[", 1)[1].split("]")[0].split(","), f"dev lacks the {extra} extra"


def _declared() -> set[str]:
    """The distributions `make` installs: the core and every extra that ``dev`` names, and dev itself."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    dev = extras["dev"]
    named = dev[0].split("[", 1)[1].split("]")[0].split(",") if dev[0].startswith("distlearn[") else []
    specs = project["dependencies"] + dev + [spec for extra in named for spec in extras[extra]]
    return {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].replace("_", "-").lower() for spec in specs}


def _test_imports() -> set[str]:
    """Top-level modules the tests and examples import (or importorskip) that are not theirs or stdlib."""
    files = [*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("examples").rglob("*.py")]
    local = {path.stem for path in files} | {path.parent.name for path in files} | {"distlearn"}
    found: set[str] = set()
    for path in files:
        text = path.read_text()
        found |= set(re.findall(r"importorskip\(\"([A-Za-z_]\w*)", text))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in local}


def test_make_installs_every_package_the_tests_import():
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_test_imports()):
        names = {name.replace("_", "-").lower() for name in providers.get(module, [module])}
        if not names & declared and module != "tomli":  # tomli: the core's, on Python < 3.11 only
            missing[module] = sorted(names)
    assert not missing, f"tests import packages that the dev extra does not install: {missing}"
