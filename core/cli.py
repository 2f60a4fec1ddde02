"""Every command line in one style (TRL's `TrlParser`): a stage's settings are typed dataclasses, a YAML file holds
them (keys = field names), and `--key value` overrides any one field. Also the logging every entry point sets up.
See docs/architecture.md, section "Configuration".
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.metadata
import inspect
import json
import logging
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
COMMAND_LINE = "command line"  # where an override came from, in error messages
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
SCALARS = (bool, int, float, str, Path)  # field types converted directly; the items of a list of them likewise


class ConfigError(ValueError):
    """A config key or value that is not accepted; the message names it, where it came from and what is allowed."""


def setup_logging(level: int = logging.INFO) -> None:
    """The log format of every entry point: time, level, logger name, message."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def exit_status(body: Callable[[], object], user_errors: tuple[type[Exception], ...], logger: logging.Logger) -> int:
    """A CLI's exit status: 0 when `body` returns, 2 when it raises one of `user_errors` (bad input: the message,
    which names what to fix, is logged)."""
    try:
        body()
    except user_errors as error:
        logger.error("%s", error)
        return 2
    return 0


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions, for an output's provenance. A package that is not installed (this project run from a
    checkout on PYTHONPATH) is recorded as such: a record must not fail the work it describes, after the work."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def log_config(logger: logging.Logger, config: Mapping[str, Any]) -> None:
    """The resolved config (YAML, then the command line), logged once when a stage starts."""
    logger.info("resolved config:\n%s", json.dumps(config, indent=2, default=str))


# ---- keys ------------------------------------------------------------------------------------------------------


def check_keys(keys: Iterable[str], allowed: Iterable[str], where: str, error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming every key not in `allowed`, where it came from, and the allowed keys (close matches
    first)."""
    allowed = sorted(set(allowed))
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise error(unknown_keys_message(unknown, allowed, where))


def unknown_keys_message(unknown: Sequence[str], allowed: Sequence[str], where: str) -> str:
    close = list(dict.fromkeys(m for key in unknown for m in difflib.get_close_matches(key, allowed, n=3)))
    hint = f" (did you mean {', '.join(repr(m) for m in close)}?)" if close else ""
    ordered = close + sorted(set(allowed) - set(close))
    return f"{where}: unknown key(s) {list(unknown)}{hint}; allowed: {', '.join(ordered)}"


def field_names(*configs: type) -> list[str]:
    """The settings the dataclasses `configs` hold, in order, each once."""
    return list(dict.fromkeys(f.name for config in configs for f in dataclasses.fields(config) if f.init))


def check_required(config: type, values: Mapping[str, Any], where: str, error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming the fields of `config` that have no default and no value."""
    missing = [f.name for f in dataclasses.fields(config) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"{where}: missing key(s) {missing}; set them in the YAML or as --{missing[0]} VALUE")


def with_field_types(config: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` read from YAML as `config`'s fields hold them: lists of tuple-of-scalar fields as tuples (frozen
    configs hold no lists), strings of Path fields as Paths."""
    hints = typing.get_type_hints(config)
    return {key: _field_value(hints.get(key), value) for key, value in values.items()}


def _field_value(annotation: Any, value: Any) -> Any:
    options, _ = _options(annotation)
    if isinstance(value, list) and _is_tuple(annotation):
        return tuple(value)
    return Path(value) if isinstance(value, str) and options == [Path] else value


def read_config_file(path: str | Path, example: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A YAML file holding one mapping of settings; `example` names a file to pass instead of a missing one."""
    path = Path(path)
    if not path.is_file():
        raise error(f"config {str(path)!r} does not exist; pass a YAML such as {example}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as yaml_error:
        raise error(f"{path}: not valid YAML ({yaml_error})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping of settings (key: value), got {type(raw).__name__}")
    return raw


def config_values(path: str | Path | None, allowed: Iterable[str], overrides: Mapping[str, Any], example: str,
                  error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The settings of the YAML at `path` (none without one), `overrides` on top; unknown keys in either are an
    error naming where they came from."""
    allowed = list(allowed)
    raw = read_config_file(path, example, error) if path is not None else {}
    check_keys(raw, allowed, str(path), error)
    check_keys(overrides, allowed, "overrides", error)
    return {**raw, **overrides}


def load_dataclass(config: type, path: str | Path | None, overrides: Mapping[str, Any], example: str,
                   error: type[Exception] = ConfigError) -> Any:
    """A flat config: the YAML at `path` (the defaults without one), `overrides` on top, keys checked, values typed."""
    values = config_values(path, field_names(config), overrides, example, error)
    check_required(config, values, str(path) if path is not None else COMMAND_LINE, error)
    return config(**with_field_types(config, values))


# ---- command-line values -----------------------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_yaml(text: str) -> Any:
    """A nested value written as YAML or JSON, e.g. --datasets '[{path: train.jsonl, weight: 2}]'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"not a YAML/JSON value ({getattr(error, 'problem', error)}): {text!r}") \
            from None


def _scalar(kind: type) -> Callable[[str], Any]:
    if kind is bool:
        return parse_bool
    if kind is Path:
        return Path

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    return convert


def _union(options: list[Any]) -> Callable[[str], Any]:
    """A value of one of several types (`str | int`, `SchedulerType | str`): read as YAML, kept as written where a
    string is allowed and the YAML value is of none of the other types."""
    classes = tuple(typing.get_origin(o) or o for o in options if isinstance(typing.get_origin(o) or o, type))

    def convert(text: str) -> Any:
        value = parse_yaml(text)
        if isinstance(value, classes) and not (isinstance(value, bool) and bool not in classes):
            return value
        if any(issubclass(c, str) for c in classes):
            return text
        raise argparse.ArgumentTypeError(f"expected {' | '.join(c.__name__ for c in classes)}, got {text!r}")

    return convert


def _nullable(convert: Callable[[str], Any], takes_strings: bool) -> Callable[[str], Any]:
    """`null` (also `none` where the field takes no strings) unsets an optional field."""

    def nullable(text: str) -> Any:
        if text in ("null", "~") or (text.lower() == "none" and not takes_strings):
            return None
        return convert(text)

    return nullable


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _list_item(annotation: Any) -> Any | None:
    """The item type of list[X] / tuple[X, ...] with a scalar X; None for anything else."""
    if typing.get_origin(annotation) not in (list, tuple):
        return None
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return args[0] if len(set(args)) == 1 and args[0] in SCALARS else None


def _is_tuple(annotation: Any) -> bool:
    """tuple[X, ...] or tuple[X, ...] | None, X a scalar; a tuple of nested entries (datasets) stays the list the
    stage builds its entries from."""
    options, _ = _options(annotation)
    return len(options) == 1 and typing.get_origin(options[0]) is tuple and _list_item(options[0]) is not None


def _options(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None types of an annotation, and whether None is one of them."""
    if not _is_union(annotation):
        return [annotation], False
    args = typing.get_args(annotation)
    return [a for a in args if a is not type(None)], type(None) in args


def value_converter(annotation: Any) -> Callable[[str], Any]:
    """Command-line text -> a value of the field's type: scalars by type, list/tuple items by their type (the
    list's items come comma-separated or from repeated flags), anything nested as YAML."""
    options, nullable = _options(annotation)
    if len(options) == 1 and _list_item(options[0]) is not None:
        converter = _items(_scalar(_list_item(options[0])))
    elif len(options) == 1 and options[0] in SCALARS:
        converter = _scalar(options[0])
    elif len(options) > 1:
        converter = _union(options)
    else:  # a nested dataclass, dict, list of mappings, Any
        converter = parse_yaml
    takes_strings = any(o is str or (isinstance(o, type) and issubclass(o, str)) for o in options)
    return _nullable(converter, takes_strings) if nullable else converter


def _items(convert: Callable[[str], Any]) -> Callable[[str], list]:
    """'a,b' -> [a, b], each item converted; '[a, b]' is read as YAML."""

    def items(text: str) -> list:
        if text.startswith("["):
            return parse_yaml(text)
        return [convert(item.strip()) for item in text.split(",") if item.strip()]

    return items


def _type_name(field: dataclasses.Field, annotation: Any) -> str:
    if isinstance(field.type, str):  # the annotation as written (modules with `from __future__ import annotations`)
        return field.type
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def field_comments(config: type) -> dict[str, str]:
    """Field name -> the comments written at its definition (the lines just above it, and the one after it): our
    dataclasses document their fields in comments, and --help shows them."""
    try:
        lines = inspect.getsource(config).splitlines()
    except (OSError, TypeError):  # no source (a built-in or generated class): the help shows type and default only
        return {}
    comments, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+)\s*:[^#]*?(?:\s{2}#\s*(.*))?$", stripped)
        if match and match.group(1) not in comments:
            comments[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
        above = []
    return comments


def _shown(default: Any) -> str:
    return str(default) if isinstance(default, Path) else repr(default)


class _Extend(argparse.Action):
    """A list field: each flag's items extend the list (--modules q_proj --modules k_proj); `null` unsets it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if values is None:
            setattr(namespace, self.dest, None)
        else:
            setattr(namespace, self.dest, [*(current if isinstance(current, list) else []), *values])


# ---- the parser --------------------------------------------------------------------------------------------------


def spellings(flag: str) -> list[str]:
    """A long flag as --some_key and --some-key."""
    if not flag.startswith("--"):
        return [flag]
    name = flag[2:]
    return list(dict.fromkeys([flag, "--" + name.replace("-", "_"), "--" + name.replace("_", "-")]))


class ConfigParser(argparse.ArgumentParser):
    """The command line of a stage whose settings are the fields of `configs` (TRL's TrlParser style).

    The YAML comes as the first positional argument (when `positional`) or as --config PATH; every field is a
    flag, --key value or --key=value (--some_key and --some-key alike; a bool field also bare, --flag), converted
    by the field's type. The stage's own flags (--force, --out, ...) are added with add_argument as usual.
    `parse` returns the fields given on the command line and the other flags; the stage reads the YAML itself
    (config_values), so library callers resolve a config exactly as the command line does.
    """

    def __init__(self, *configs: type, prog: str, description: str | None = None, config_help: str = "config YAML",
                 positional: bool = True, required: bool = True, usage: str | None = None):
        # The default usage line would list every field (SFTConfig alone has 135): name the form instead.
        usage = usage or f"%(prog)s {'CONFIG ' if positional else '[--config CONFIG] '}[--key value ...]"
        super().__init__(prog=prog, description=description, usage=usage, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.config_required = required
        self._bool_flags: set[str] = set()
        self._fields: dict[str, Any] = {}  # field name -> its annotation
        if positional:
            super().add_argument("config_file", nargs="?", metavar="CONFIG", help=config_help)
        super().add_argument("--config", dest="config_flag", metavar="CONFIG",
                             help=config_help + (" (or as the first argument)" if positional else ""))
        for config in configs:
            self._add_fields(config)

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        """argparse's add_argument, a long flag also accepted with '-' and '_' swapped."""
        return super().add_argument(*[s for flag in flags for s in spellings(flag)], **kwargs)

    def _add_fields(self, config: type) -> None:
        group = self.add_argument_group(f"{config.__name__} fields (YAML keys; --key value overrides the YAML)")
        try:
            hints = typing.get_type_hints(config)
        except (NameError, TypeError):  # an annotation that does not resolve: its values are read as YAML
            hints = {}
        comments = field_comments(config)
        for field in dataclasses.fields(config):
            if not field.init or field.name in self._fields:
                continue
            annotation = hints.get(field.name, Any)
            self._fields[field.name] = annotation
            help_text = field.metadata.get("help") or comments.get(field.name, "")
            group.add_argument(*spellings(f"--{field.name}"), dest=field.name, default=argparse.SUPPRESS,
                               **self._field_kwargs(field, annotation, help_text))

    def _field_kwargs(self, field: dataclasses.Field, annotation: Any, help_text: str) -> dict[str, Any]:
        default = _default(field)
        shown = "required" if default is dataclasses.MISSING else f"default {_shown(default)}"
        kwargs = {"type": value_converter(annotation), "metavar": "VALUE",
                  "help": f"{_type_name(field, annotation)}, {shown}. {help_text}".replace("%", "%%").strip()}
        options, _ = _options(annotation)
        if options == [bool]:
            self._bool_flags.update(spellings(f"--{field.name}"))
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif len(options) == 1 and _list_item(options[0]) is not None:
            kwargs.update(action=_Extend)
        return kwargs

    def parse(self, argv: Sequence[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
        """(overrides, args): the fields given on the command line, converted; and the stage's own flags, with
        args.config the YAML's path (None when none was given and none is required)."""
        args, extras = self.parse_known_args(self._bare_bools(argv))
        self._reject_extras(extras)
        overrides = {name: _field_value(self._fields[name], getattr(args, name))
                     for name in self._fields if hasattr(args, name)}
        for name in overrides:
            delattr(args, name)
        args.config = self._config_path(args.__dict__.pop("config_file", None), args.__dict__.pop("config_flag"))
        return overrides, args

    def _bare_bools(self, argv: Sequence[str] | None) -> list[str]:
        """`--flag` of a bool field followed by anything but a bool word -> `--flag=true`, so a bare flag never
        swallows the next argument."""
        argv = list(sys.argv[1:] if argv is None else argv)
        words = (*TRUE_WORDS, *FALSE_WORDS)
        return [f"{arg}=true" if arg in self._bool_flags and (i + 1 == len(argv) or argv[i + 1].lower() not in words)
                else arg for i, arg in enumerate(argv)]

    def _reject_extras(self, extras: list[str]) -> None:
        flags = [arg for arg in extras if arg.startswith("--")]
        if flags:
            allowed = [action.option_strings[0][2:].replace("-", "_") for action in self._actions
                       if action.option_strings and action.option_strings[0].startswith("--")]
            self.error(unknown_keys_message([flag[2:].split("=")[0].replace("-", "_") for flag in flags], allowed,
                                            COMMAND_LINE))
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")


    def _config_path(self, positional: str | None, flag: str | None) -> Path | None:
        if positional and flag and positional != flag:
            self.error(f"two configs given, {positional!r} and --config {flag!r}; give one")
        path = positional or flag
        if path is None and self.config_required:
            self.error(f"give the config YAML: {self.prog} CONFIG.yaml (or --config CONFIG.yaml)")
        return Path(path) if path else None
