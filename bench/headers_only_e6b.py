"""A full-size raw E6B stack folder that holds no weights: config.json and stack.json only, planned by
the stacker from a headers-only full-size E4B (real names and shapes, zero bytes of tensor data).

    .venv/bin/python -m bench.headers_only_e6b OUT
    .venv/bin/python -m heal.plan recipes/heal.yaml --stack OUT/gemma-4-E6B-it-raw

Enough for `python -m heal.plan`, which reads no weights (stack.json's source shard hashes are placeholders);
the distillation teacher resolves to OUT/gemma-4-E4B-it, a header-only model.safetensors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.checkpoints import gemma4_e4b
from core.checkpoint import open_source
from core.files import encode_safetensors_header
from stack.manifest import MANIFEST_NAME, manifest_from_plan
from stack.plan import build_plan, saved_tensor_shapes
from stack.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = REPO / "recipes" / "e6b.yaml"
UNREAD_SHA256 = "0" * 64  # the source shards' hashes: headers-only shards have no data to hash


def write_headers_only_e4b(directory: Path) -> Path:
    """Gemma-4 E4B at full size (bench/checkpoints.py's dimensions): config.json + a header-only model.safetensors."""
    config = gemma4_e4b(scale=1.0).config
    config.architectures = ["Gemma4ForConditionalGeneration"]  # as save_pretrained records it
    _, shapes = saved_tensor_shapes(config.to_dict())
    directory.mkdir(parents=True, exist_ok=True)
    header = encode_safetensors_header([(name, "BF16", shape) for name, shape in shapes.items()])
    (directory / "model.safetensors").write_bytes(header)  # the header alone: no tensor data
    config.save_pretrained(directory)
    return directory


def build(out: Path) -> Path:
    """Write OUT/gemma-4-E4B-it (headers only) and OUT/gemma-4-E6B-it-raw (config + stack.json); returns the stack."""
    source = write_headers_only_e4b(out / "gemma-4-E4B-it")
    checkpoint = open_source(str(source))
    plan = build_plan(load_recipe(SEED_RECIPE, source_override=str(source)), checkpoint)
    stack = out / "gemma-4-E6B-it-raw"
    tmp = stack.with_name(f".{stack.name}.partial")  # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    manifest = manifest_from_plan(plan, {shard.name: UNREAD_SHA256 for shard in checkpoint.shards})
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(stack, ignore_errors=True)
    tmp.rename(stack)
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.headers_only_e6b", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the two checkpoints into")
    print(build(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
