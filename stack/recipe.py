"""Stack recipes: mergekit's passthrough YAML, accepted as-is, plus this project's `stack:` block (StackOptions, each
field also a --key value override of `python -m stack`).

Unknown keys are an error, so a typo never silently changes the output. An example recipe: docs/architecture.md,
section "The stacker (`stack/`)"; the seed one is recipes/e6b.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.cli import check_keys, field_names


class RecipeError(ValueError):
    pass


KV_GRAFT_SOURCES = ("producer", "checkpoint")


@dataclass(frozen=True)
class StackOptions:
    # Where a slot that must produce K/V, but whose source layer was a KV consumer, gets k_proj,
    # v_proj and k_norm: "producer" = the source model's producer layer of the same attention type
    # (the K/V the layer was trained to read); "checkpoint" = the consumer layer's own dead weights,
    # when the checkpoint still holds them.
    kv_graft_source: str = "producer"
    # Largest output shard, in bytes or with a unit: "5GB" (10^9), "500MiB" (2^20).
    max_shard_size: str | int = "5GB"

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


@dataclass(frozen=True)
class SliceSpec:
    model: str
    layer_range: tuple[int, int]  # half-open [start, stop)

    @property
    def layers(self) -> range:
        return range(*self.layer_range)


@dataclass(frozen=True)
class Recipe:
    slices: tuple[SliceSpec, ...]
    options: StackOptions = field(default_factory=StackOptions)
    dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # as loaded, for stack.json

    @property
    def model(self) -> str:
        """The one source model all slices come from."""
        return self.slices[0].model

    @property
    def source_layers(self) -> list[int]:
        """Source layer of each output slot, in slot order."""
        return [layer for spec in self.slices for layer in spec.layers]


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; ints pass through."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise RecipeError(f"stack.max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


_TOP_LEVEL_KEYS = {"merge_method", "slices", "dtype", "stack", "tokenizer_source", "base_model"}
_SOURCE_KEYS = {"model", "layer_range"}


def load_recipe(path: str | Path, source_override: str | None = None,
                options: dict[str, Any] | None = None) -> Recipe:
    """The recipe at `path`; `source_override` replaces every slice's model, `options` (StackOptions fields, e.g.
    from the command line) go on top of the `stack:` block."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist; pass a YAML such as recipes/e6b.yaml")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a YAML mapping with a 'slices' list")
    return parse_recipe(raw, source_override, name=str(path), options=options)


def parse_recipe(raw: dict[str, Any], source_override: str | None = None, name: str = "recipe",
                 options: dict[str, Any] | None = None) -> Recipe:
    check_keys(raw, _TOP_LEVEL_KEYS, name, RecipeError)
    if raw.get("merge_method", "passthrough") != "passthrough":
        raise RecipeError(f"{name}: merge_method {raw['merge_method']!r} is not supported; "
                          "the stacker does passthrough only")
    slices = tuple(_parse_slice(i, s, source_override, name) for i, s in enumerate(_require_list(raw, "slices", name)))
    if not slices:
        raise RecipeError(f"{name}: 'slices' is empty; add at least one slice with a layer_range")
    models = {s.model for s in slices}
    if len(models) > 1:
        raise RecipeError(f"{name}: slices name several models {sorted(models)}; the stacker re-stacks one model, "
                          "so give every slice the same model (or pass --source to override them all)")
    for key in ("base_model", "tokenizer_source"):
        if raw.get(key) not in (None, "base", slices[0].model):
            raise RecipeError(f"{name}: {key} {raw[key]!r} differs from the slices' model {slices[0].model!r}; "
                              "remove it, since tokenizer and base come from the one source model")
    if options:  # stack.json records the options the stack was written with
        raw = {**raw, "stack": {**_options_block(raw, name), **options}}
    return Recipe(slices=slices, options=_parse_options(_options_block(raw, name), name), dtype=raw.get("dtype"),
                  raw=raw)


def _require_list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key)
    if not isinstance(value, list):
        raise RecipeError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _parse_slice(index: int, raw_slice: Any, source_override: str | None, name: str) -> SliceSpec:
    where = f"{name}: slices[{index}]"
    if not isinstance(raw_slice, dict) or set(raw_slice) != {"sources"}:
        raise RecipeError(f"{where} must be a mapping with exactly one key, 'sources'")
    sources = _require_list(raw_slice, "sources", where)
    if len(sources) != 1 or not isinstance(sources[0], dict):
        raise RecipeError(f"{where}.sources must hold exactly one source (passthrough copies, it does not blend)")
    source = sources[0]
    if "parameters" in source:
        raise RecipeError(f"{where}.sources[0].parameters is not supported: "
                          "the stacker copies bytes and never scales them")
    check_keys(source, _SOURCE_KEYS, f"{where}.sources[0]", RecipeError)
    layer_range = source.get("layer_range")
    if not (isinstance(layer_range, list) and len(layer_range) == 2 and all(type(x) is int for x in layer_range)):
        raise RecipeError(f"{where}.sources[0].layer_range must be two integers [start, stop), got {layer_range!r}")
    start, stop = layer_range
    if start < 0 or stop <= start:
        raise RecipeError(f"{where}: layer_range [{start}, {stop}) is empty or negative; "
                          "ranges are half-open, so [a, b] needs 0 <= a < b")
    model = source_override or source.get("model")
    if not model:
        raise RecipeError(f"{where}.sources[0].model is missing; name the source model or pass --source")
    return SliceSpec(model=str(model), layer_range=(start, stop))


def _options_block(raw: dict[str, Any], name: str) -> dict[str, Any]:
    block = raw.get("stack") or {}
    if not isinstance(block, dict):
        raise RecipeError(f"{name}: 'stack' must be a mapping of options")
    return block


def _parse_options(raw_options: dict[str, Any], name: str) -> StackOptions:
    check_keys(raw_options, field_names(StackOptions), f"{name}: stack", RecipeError)
    options = StackOptions(**raw_options)
    if options.kv_graft_source not in KV_GRAFT_SOURCES:
        raise RecipeError(f"{name}: stack.kv_graft_source {options.kv_graft_source!r} "
                          f"must be one of {KV_GRAFT_SOURCES}")
    parse_size(options.max_shard_size)  # fail on a bad size now, before any work is done
    return options
