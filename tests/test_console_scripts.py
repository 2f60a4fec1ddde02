"""pyproject's console commands: each names a real `main(argv)` whose --help exits 0, and every CLI has one.

Read from pyproject.toml itself, not from installed metadata, so an entry added or renamed there is checked
before the package is reinstalled.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stack", "fisher", "heal", "evaluation", "demo")


def console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"].get("scripts", {})


def cli_modules() -> set[str]:
    """Modules run as programs: the ones with an `if __name__ == "__main__":` block (demo/__main__.py only
    forwards to demo.run, which has its own)."""
    found = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in tree.body:
                if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                    found.add(f"{package}.{path.stem}")
    return found - {"demo.__main__"}


def test_every_cli_module_has_a_console_command():
    listed = {target.split(":")[0] for target in console_scripts().values()}
    missing = sorted(cli_modules() - listed)
    assert not missing, f"add a [project.scripts] entry in pyproject.toml for: {missing}"


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_command_resolves_and_its_help_exits_0(name, capsys):
    module_name, _, attr = console_scripts()[name].partition(":")
    main = getattr(importlib.import_module(module_name), attr)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0, f"{name} --help exited {exit_info.value.code}"
    assert "usage:" in capsys.readouterr().out
