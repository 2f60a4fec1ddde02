"""`stack.json`: the manifest that fisher/ and heal/ read. Its format is documented in
docs/architecture.md ("The stack manifest"); this module writes and reads it, nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import __version__
from .plan import StackPlan

MANIFEST_NAME = "stack.json"
FORMAT_VERSION = 1


def manifest_from_plan(plan: StackPlan, source_shard_sha256: dict[str, str]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "stacker_version": __version__,
        "architecture": plan.architecture.name,
        "layer_prefix": plan.architecture.layer_prefix,
        "source": {
            "model": plan.source_model,
            "num_hidden_layers": plan.source_num_layers,
            "shard_sha256": dict(sorted(source_shard_sha256.items())),
        },
        "num_hidden_layers": len(plan.slots),
        "num_kv_shared_layers": plan.num_kv_shared_layers,
        "seams": [asdict(seam) for seam in plan.seams],
        "slots": [asdict(slot) for slot in plan.slots],
        "recipe": plan.recipe.raw,
    }


class ManifestError(ValueError):
    pass


def load_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a stack written by `python -m stack`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {manifest.get('format_version')!r}; "
                            f"this code reads {FORMAT_VERSION}")
    return manifest


def check_manifest_matches_config(model_dir: str | Path, manifest: dict[str, Any]) -> None:
    """stack.json must describe the checkpoint beside it: its layer count, and each slot's attention type
    against config.json's layer_types. A hand-edited or stale stack.json would map Fisher and LoRA
    targets onto the wrong layers."""
    from .architectures import UnsupportedArchitectureError, architecture_named

    path, config_path = Path(model_dir) / MANIFEST_NAME, Path(model_dir) / "config.json"
    try:
        arch = architecture_named(manifest["architecture"])
    except UnsupportedArchitectureError as error:
        raise ManifestError(f"{path}: {error}") from None
    config = json.loads(config_path.read_text())
    text = config.get(arch.text_config_key, {}) if arch.text_config_key else config
    fix = "restore the stack.json written by `python -m stack` with this checkpoint, or stack again"
    layers, slots = text.get("num_hidden_layers"), manifest["slots"]
    if not manifest["num_hidden_layers"] == len(slots) == layers:
        raise ManifestError(f"{path} records {manifest['num_hidden_layers']} layers and {len(slots)} slots but "
                            f"{config_path} has num_hidden_layers {layers}; {fix}")
    for slot, layer_type in zip(slots, text.get("layer_types") or []):
        if slot["attention_type"] != layer_type:
            raise ManifestError(f"{path}: slot {slot['index']} is {slot['attention_type']} but {config_path} has "
                                f"layer_types[{slot['index']}] = {layer_type}; {fix}")
