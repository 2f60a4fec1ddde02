"""pyproject's console commands: each names a real `main(argv)` whose --help exits 0, and every CLI has one; every
stage CLI with a config takes single-key overrides and names an unknown key.

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


# ---- every stage CLI with a config: one key overridden on the command line reaches the resolved config ----------

RECIPES = ROOT / "recipes"
STAGE_CLIS = {
    # module: (the function main resolves its config with, argv with one override, the value it must reach)
    "stack.__main__": ("load_recipe", [RECIPES / "e6b.yaml", "--max_shard_size", "2GB", "--dry-run"],
                       lambda recipe: recipe.options.max_shard_bytes == 2 * 10**9),
    "fisher.__main__": ("load_config", [RECIPES / "fisher.yaml", "--batch_size", "3"],
                        lambda config: config.batch_size == 3),
    # The recipe asks for bf16, which SFTConfig refuses without a GPU: --use_cpu is an override too.
    "heal.train": ("load_config", [RECIPES / "heal.yaml", "--learning_rate", "1e-4", "--use_cpu"],
                   lambda configs: configs[1].learning_rate == 1e-4),
    "heal.plan": ("load_recipe", [RECIPES / "heal.yaml", "--seam-width", "3"],
                  lambda configs: configs[0].seam_width == 3),
    "heal.card": ("load_recipe", [RECIPES / "heal.yaml", "--output_dir", "elsewhere"],
                  lambda configs: configs[1].output_dir == "elsewhere"),
    "evaluation.__main__": ("load_dataclass", ["--model", "a=dir", "--num-prompts", "5"],
                            lambda config: config.num_prompts == 5),
    "heal.answers": ("load_dataclass", ["--model", "m", "--data", "d.jsonl", "--out", "o", "--temperature", "0.5"],
                     lambda config: config.temperature == 0.5),
}


class Resolved(Exception):
    """Raised with the resolved config, in place of running the stage."""


@pytest.mark.parametrize("module_name", sorted(STAGE_CLIS))
def test_a_single_key_override_reaches_the_resolved_config(module_name, monkeypatch):
    function_name, argv, check = STAGE_CLIS[module_name]
    module = importlib.import_module(module_name)
    # heal.card imports heal.plan's load_recipe when it runs: patch it where it lives.
    owner = importlib.import_module("heal.plan") if module_name == "heal.card" else module
    resolve = getattr(owner, function_name)

    def resolve_and_stop(*args, **kwargs):
        raise Resolved(resolve(*args, **kwargs))

    monkeypatch.setattr(owner, function_name, resolve_and_stop)
    with pytest.raises(Resolved) as resolved:
        module.main([str(arg) for arg in argv])
    assert check(resolved.value.args[0])


@pytest.mark.parametrize("module_name", sorted(STAGE_CLIS))
def test_an_unknown_key_exits_2_and_names_it(module_name, capsys):
    _, argv, _ = STAGE_CLIS[module_name]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module_name).main([*map(str, argv), "--no_such_key", "1"])
    assert exit_info.value.code == 2
    assert "command line: unknown key(s) ['no_such_key']" in capsys.readouterr().err
