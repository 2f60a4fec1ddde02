"""`stack.json`: the manifest that fisher/ and heal/ read. Its format is documented in
docs/architecture.md ("The stack manifest"); this module writes it, and reads it into a typed `StackManifest`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .architectures import Architecture, UnsupportedArchitectureError, architecture_named
from .plan import Seam, Slot, StackPlan

MANIFEST_NAME = "stack.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class SourceRecord:
    model: str  # the source as given to the stacker: a hub id or a local folder
    num_hidden_layers: int
    shard_sha256: dict[str, str]  # shard file name -> sha256 hex digest


@dataclass(frozen=True)
class StackManifest:
    """stack.json, read. Keys and nesting are those of the file; slots and seams are the plan's own types."""

    format_version: int
    stacker_version: str
    architecture: str  # the stack/architectures.py row's name
    layer_prefix: str  # decoder layers live under f"{layer_prefix}{i}."
    source: SourceRecord
    num_hidden_layers: int
    num_kv_shared_layers: int
    seams: tuple[Seam, ...]
    slots: tuple[Slot, ...]
    recipe: dict[str, Any]  # the recipe YAML as loaded

    @property
    def arch(self) -> Architecture:
        return architecture_named(self.architecture)

    def is_grafted_kv(self, slot: Slot, suffix: str) -> bool:
        """Whether `suffix` (a tensor name inside a layer) is a K/V tensor this slot took from its donor layer.
        The architecture row says which tensors are K/V (Architecture.is_kv_tensor)."""
        return slot.kv_graft_from is not None and self.arch.is_kv_tensor(suffix)

    def source_layer_of(self, slot: Slot, suffix: str) -> int:
        """The source layer whose tensor `suffix` this slot holds: the K/V donor's for grafted K/V."""
        return slot.kv_graft_from if self.is_grafted_kv(slot, suffix) else slot.source_layer

    def slots_near_seams(self, width: int) -> list[Slot]:
        """The slots within ±`width` of a seam, in order: for a seam at slot s (between s-1 and s), slots
        s-width .. s+width-1. The heal trains these (heal/targets.py); the Fisher stage's factors cover them."""
        near = {index for seam in self.seams for index in range(seam.slot - width, seam.slot + width)}
        return [slot for slot in self.slots if slot.index in near]


def manifest_from_plan(plan: StackPlan, source_shard_sha256: dict[str, str]) -> dict[str, Any]:
    """The JSON object written as stack.json (asdict of a StackManifest)."""
    manifest = StackManifest(
        format_version=FORMAT_VERSION,
        stacker_version=__version__,
        architecture=plan.architecture.name,
        layer_prefix=plan.architecture.layer_prefix,
        source=SourceRecord(plan.source_model, plan.source_num_layers, dict(sorted(source_shard_sha256.items()))),
        num_hidden_layers=len(plan.slots),
        num_kv_shared_layers=plan.num_kv_shared_layers,
        seams=plan.seams,
        slots=plan.slots,
        recipe=plan.recipe.raw,
    )
    return asdict(manifest)


def load_manifest(model_dir: str | Path) -> StackManifest:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a stack written by `python -m stack`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not JSON ({error}); restore the stack.json written by `python -m stack`, "
                            "or stack again") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise ManifestError(f"{path} has format_version {found!r}; this code reads {FORMAT_VERSION}")
    fields = _fields(StackManifest, raw, path, "")
    fields["source"] = SourceRecord(**_fields(SourceRecord, fields["source"], path, "source"))
    fields["seams"] = tuple(Seam(**_fields(Seam, seam, path, f"seams[{i}]")) for i, seam in
                            enumerate(_list(fields["seams"], path, "seams")))
    fields["slots"] = tuple(Slot(**_fields(Slot, slot, path, f"slots[{i}]")) for i, slot in
                            enumerate(_list(fields["slots"], path, "slots")))
    return StackManifest(**fields)


def _fields(cls: type, raw: Any, path: Path, where: str) -> dict[str, Any]:
    """`raw`'s entries, which must be exactly `cls`'s fields: a missing or an unknown key names itself and the file."""
    place = f"{path}: {where}" if where else str(path)
    if not isinstance(raw, dict):
        raise ManifestError(f"{place} must be a JSON object, got {type(raw).__name__}; {_FIX}")
    names = [field.name for field in dataclasses.fields(cls)]
    missing, unknown = [n for n in names if n not in raw], sorted(set(raw) - set(names))
    if missing or unknown:
        what = f"has no key {missing[0]!r}" if missing else f"has an unknown key {unknown[0]!r}"
        raise ManifestError(f"{place} {what} (a {cls.__name__} has exactly {names}); {_FIX}")
    return dict(raw)


def _list(raw: Any, path: Path, key: str) -> list:
    if not isinstance(raw, list):
        raise ManifestError(f"{path}: {key} must be a JSON list, got {type(raw).__name__}; {_FIX}")
    return raw


_FIX = "restore the stack.json written by `python -m stack` with this checkpoint, or stack again"


def check_manifest_matches_config(model_dir: str | Path, manifest: StackManifest) -> None:
    """stack.json must describe the checkpoint beside it: its layer count, and each slot's attention type
    against config.json's layer_types. A hand-edited or stale stack.json would map Fisher and LoRA
    targets onto the wrong layers."""
    path, config_path = Path(model_dir) / MANIFEST_NAME, Path(model_dir) / "config.json"
    try:
        arch = manifest.arch
    except UnsupportedArchitectureError as error:
        raise ManifestError(f"{path}: {error}") from None
    config = json.loads(config_path.read_text())
    text = config.get(arch.text_config_key, {}) if arch.text_config_key else config
    layers, slots = text.get("num_hidden_layers"), manifest.slots
    if not manifest.num_hidden_layers == len(slots) == layers:
        raise ManifestError(f"{path} records {manifest.num_hidden_layers} layers and {len(slots)} slots but "
                            f"{config_path} has num_hidden_layers {layers}; {_FIX}")
    for slot, layer_type in zip(slots, text.get("layer_types") or []):
        if slot.attention_type != layer_type:
            raise ManifestError(f"{path}: slot {slot.index} is {slot.attention_type} but {config_path} has "
                                f"layer_types[{slot.index}] = {layer_type}; {_FIX}")
