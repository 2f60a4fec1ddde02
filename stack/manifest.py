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


def load_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a stack written by `python -m stack`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    return manifest
