"""core/cli.py, the one configuration style: a YAML of a dataclass's fields, --key value overrides converted by the
field's type, unknown keys named with their source and the allowed keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from core.cli import (
    COMMAND_LINE,
    ConfigError,
    ConfigParser,
    check_keys,
    config_values,
    field_names,
    load_dataclass,
    log_config,
    with_field_types,
)


@dataclass(frozen=True)
class Settings:
    model: str  # the model folder
    datasets: tuple[dict, ...] = ()
    batch_size: int = 4  # rows per step
    learning_rate: float = 1e-3
    protect: bool = True
    fisher: str | None = None
    num_examples: int | None = None
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    targets: tuple[str, ...] | None = None
    max_shard_size: str | int = "5GB"
    out: Path = Path("out")


def parser(**kwargs) -> ConfigParser:
    result = ConfigParser(Settings, prog="prog", **kwargs)
    result.add_argument("--dry-run", action="store_true")
    return result


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def usage_error(capsys, argv: list[str], **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser(**kwargs).parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_values_are_converted_by_the_field_type():
    overrides, args = parser().parse(["r.yaml", "--batch_size", "8", "--learning_rate=1e-4", "--out", "o/x",
                                      "--max_shard_size", "2GB", "--datasets", "[{path: a.jsonl, weight: 2}]"])
    assert overrides == {"batch_size": 8, "learning_rate": 1e-4, "out": Path("o/x"), "max_shard_size": "2GB",
                         "datasets": [{"path": "a.jsonl", "weight": 2}]}
    assert args.config == Path("r.yaml") and args.dry_run is False


def test_a_union_keeps_the_type_the_text_reads_as():
    assert parser().parse(["r.yaml", "--max_shard_size", "1000"])[0] == {"max_shard_size": 1000}


@pytest.mark.parametrize("flag", ["--batch-size", "--batch_size"])
def test_dashes_and_underscores_are_one_key(flag):
    assert parser().parse(["r.yaml", flag, "3"])[0] == {"batch_size": 3}
    assert parser().parse(["r.yaml", "--dry_run"])[1].dry_run is True  # the stage's own flags too


@pytest.mark.parametrize("argv, expected", [
    (["--protect"], True),
    (["--protect", "false"], False),
    (["--protect", "no"], False),
    (["--protect=true"], True),
    (["--protect", "r.yaml"], True),  # a bare flag does not swallow the recipe after it
])
def test_bools(argv, expected):
    overrides, args = parser().parse([*argv] if "r.yaml" in argv else ["r.yaml", *argv])
    assert overrides == {"protect": expected} and args.config == Path("r.yaml")


def test_lists_come_comma_separated_or_repeated_and_tuple_fields_stay_tuples():
    assert parser().parse(["r.yaml", "--modules", "q_proj,k_proj"])[0] == {"modules": ("q_proj", "k_proj")}
    assert parser().parse(["r.yaml", "--modules", "q_proj", "--modules", "o_proj"])[0] == {
        "modules": ("q_proj", "o_proj")}
    assert parser().parse(["r.yaml", "--targets", "[a, b]"])[0] == {"targets": ("a", "b")}


def test_null_unsets_an_optional_field():
    overrides, _ = parser().parse(["r.yaml", "--fisher", "null", "--num_examples", "none", "--targets", "null"])
    assert overrides == {"fisher": None, "num_examples": None, "targets": None}


def test_a_bad_value_is_a_usage_error_naming_the_flag(capsys):
    error = usage_error(capsys, ["r.yaml", "--batch_size", "many"])
    assert "--batch_size" in error and "expected int, got 'many'" in error


def test_an_unknown_key_exits_2_with_the_close_matches_first(capsys):
    error = usage_error(capsys, ["r.yaml", "--batch-sise", "3"])
    assert "command line: unknown key(s) ['batch_sise'] (did you mean 'batch_size'?)" in error
    assert "; allowed: batch_size, " in error and "learning_rate" in error


def test_the_config_comes_first_or_as_config(tmp_path):
    assert parser().parse(["--config", "r.yaml", "--batch_size", "2"]) == parser().parse(["r.yaml", "--batch_size",
                                                                                          "2"])


def test_a_missing_config_and_two_configs_are_usage_errors(capsys):
    assert "give the config YAML" in usage_error(capsys, ["--batch_size", "2"])
    assert "two configs given" in usage_error(capsys, ["a.yaml", "--config", "b.yaml"])
    assert parser(required=False, positional=False).parse([])[1].config is None


def test_the_command_line_goes_on_top_of_the_yaml(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"model": "m", "batch_size": 2, "learning_rate": 0.1})
    overrides, args = parser().parse([str(recipe), "--batch_size", "16"])
    config = load_dataclass(Settings, args.config, overrides, "r.yaml")
    assert (config.model, config.batch_size, config.learning_rate) == ("m", 16, 0.1)


def test_yaml_values_get_the_field_types(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"model": "m", "modules": ["o_proj"], "out": "x/y"})
    config = load_dataclass(Settings, recipe, {}, "r.yaml")
    assert config.modules == ("o_proj",) and config.out == Path("x/y")
    assert with_field_types(Settings, {"targets": ["a"], "fisher": "f"}) == {"targets": ("a",), "fisher": "f"}


def test_an_unknown_yaml_key_names_the_file_and_the_allowed_keys(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"model": "m", "learning_rat": 0.1})
    with pytest.raises(ConfigError) as error:
        config_values(recipe, field_names(Settings), {}, "r.yaml")
    assert f"{recipe}: unknown key(s) ['learning_rat'] (did you mean 'learning_rate'?); allowed: learning_rate, " \
        in str(error.value)


def test_missing_files_required_keys_and_non_mappings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config '.*nope.yaml' does not exist; pass a YAML such as recipes/x.yaml"):
        load_dataclass(Settings, tmp_path / "nope.yaml", {}, "recipes/x.yaml")
    with pytest.raises(ConfigError, match=rf"{COMMAND_LINE}: missing key\(s\) \['model'\]; set them in the YAML or "
                       "as --model VALUE"):
        load_dataclass(Settings, None, {"batch_size": 2}, "r.yaml")
    (tmp_path / "list.yaml").write_text("- model\n")
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        load_dataclass(Settings, tmp_path / "list.yaml", {}, "r.yaml")


def test_check_keys_raises_the_callers_error():
    class StageError(ValueError):
        pass

    with pytest.raises(StageError, match=r"where: unknown key\(s\) \['x'\]; allowed: a, b"):
        check_keys({"a": 1, "x": 2}, ["b", "a"], "where", StageError)


def test_help_shows_each_field_with_its_type_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: prog CONFIG [--key value ...]" in out
    assert "--batch_size VALUE, --batch-size VALUE int, default 4. rows per step" in out
    assert "--model VALUE str, required. the model folder" in out


def test_the_resolved_config_is_logged(caplog):
    with caplog.at_level(logging.INFO):
        log_config(logging.getLogger("stage"), {"batch_size": 4, "out": Path("o")})
    assert 'resolved config:\n{\n  "batch_size": 4,\n  "out": "o"\n}' in caplog.text
