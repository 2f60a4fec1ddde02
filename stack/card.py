"""The raw stack's model card: README.md in the stack folder, written by the stacker from the files beside it.

    python -m stack.card OUT [--source SOURCE]     # (re)write OUT/README.md for an existing stack

Every fact comes from the written folder, never from the recipe's intent; which fact comes from which file:
docs/architecture.md, section "Model cards". What heal/card.py writes the same way (the source's Hub facts,
ranges, paths, rendering) is in core/cards.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import yaml

from core.cards import (
    CARD_NAME,
    REPO,
    SOURCE_PLACEHOLDER,
    SourceFacts,
    display_path,
    ranges,
    render_card,
    source_facts,
    span,
)
from core.cli import setup_logging
from core.files import read_safetensors_header
from core.outputs import write_file_atomic

from .architectures import Architecture
from .manifest import StackManifest, load_manifest
from .plan import Seam, Slot
from .recipe import load_recipe

logger = logging.getLogger(__name__)

SEED_RECIPE = REPO / "recipes" / "e6b.yaml"
# What ../shared/seed-model-card.txt states about the seed recipe's stack, and this card corrects.
SEED_CARD_DECODER_PARAMETERS = 6.65e9
SEED_CARD_RHYTHM = 6  # "E4B's 5-sliding : 1-full rhythm": full attention at every 6th slot, by index


# ---- the card ------------------------------------------------------------------------------------------------


def write_stack_card(folder: Path, source: SourceFacts, out_dir: Path) -> str:
    """README.md into `folder` (the stack being written, or an existing one); `out_dir` is where it will live,
    for the rebuild command. Returns the card."""
    card = stack_card(folder, source, out_dir)
    write_file_atomic(Path(folder) / CARD_NAME, card)
    return card


def stack_card(folder: Path, source: SourceFacts, out_dir: Path) -> str:
    folder = Path(folder)
    manifest = load_manifest(folder)
    config = json.loads((folder / "config.json").read_text())
    arch = manifest.arch
    text_config = config.get(arch.text_config_key, {}) if arch.text_config_key else config
    shapes = checkpoint_shapes(folder)
    slots = manifest.slots
    model_type = config.get("model_type") or arch.name  # the root's: gemma4, llama (a Hub tag)
    data = {
        "base_model": source.hub_id,
        "base_model_relation": "merge",
        "license": source.license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["depth-upscale", "merge", "raw", model_type],
    }
    body = [
        f"# {Path(out_dir).name}",
        "",
        "> **Raw, do not deploy.** This is a depth-upscaled stack before any healing: its layers are byte copies "
        "of the source's, run at depths they were not trained for, so it is expected to lose coherence (loops, "
        "drift) under normal decoding. It is a base for a heal (`heal/train.py`) and for reproducing the stack.",
        "",
        _summary(manifest, source, len(shapes)),
        "",
        *_slot_section(manifest),
        *_attention_section(slots),
        *_kv_section(manifest, arch),
        *_ple_section(arch, text_config, shapes, manifest),
        *_parameter_section(arch, shapes),
        *_recipe_section(manifest, source, out_dir),
        *_seed_section(manifest, arch, shapes),
    ]
    return render_card(data, "\n".join(body))


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers of the folder's shards (no tensor data is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
    else:
        shards = ["model.safetensors"]
    return {name: info.shape for shard in shards for name, info in read_safetensors_header(folder / shard).items()}


def _summary(manifest: StackManifest, source: SourceFacts, tensors: int) -> str:
    name = f"`{source.hub_id}`" if source.hub_id else "a local model folder (no hub id known)"
    revision = f" at revision `{source.revision}`" if source.revision else ""
    return (f"Stacked from {name}{revision} by `python -m stack` (stacker {manifest.stacker_version}, "
            f"architecture `{manifest.architecture}`): {manifest.source.num_hidden_layers} source layers "
            f"re-sequenced into {manifest.num_hidden_layers} output slots. Passthrough: each of the {tensors} "
            "tensors is a byte copy of a source tensor (or of its per-layer blocks); nothing is blended or scaled. "
            "`stack.json` beside this card maps every slot to its source layer and records the sha256 of each "
            "source shard.")


def _slot_section(manifest: StackManifest) -> list[str]:
    lines = ["## Slots", "", "Output slots and the source layers they copy, one row per contiguous run; a seam is "
             "where a run starts over at another source layer.", "",
             "| output slots | source layers | seam before the run |", "|---|---|---|"]
    seams = {seam.slot: seam for seam in manifest.seams}
    for run in _slot_runs(manifest.slots):
        first, last = run[0], run[-1]
        seam = seams.get(first.index)
        where = "—" if seam is None else _seam_text(seam)
        lines.append(f"| {span(first.index, last.index)} | {span(first.source_layer, last.source_layer)} | "
                     f"{where} |")
    seam_list = ", ".join(f"slot {s.slot} ({_seam_text(s)})" for s in manifest.seams) or "none"
    return lines + ["", f"Seams: {seam_list}.", ""]


def _seam_text(seam: Seam) -> str:
    kind = "rewind" if seam.to_layer <= seam.from_layer else "skip"
    return f"{kind} L{seam.from_layer} → L{seam.to_layer}"


def _slot_runs(slots: tuple[Slot, ...]) -> list[list[Slot]]:
    runs: list[list[Slot]] = []
    for slot in slots:
        if runs and slot.source_layer == runs[-1][-1].source_layer + 1:
            runs[-1].append(slot)
        else:
            runs.append([slot])
    return runs


def _attention_section(slots: tuple[Slot, ...]) -> list[str]:
    by_type: dict[str, list[int]] = {}
    for slot in slots:
        by_type.setdefault(slot.attention_type, []).append(slot.index)
    lines = ["## Attention types", "", "Each slot keeps its source layer's attention type (a layer's weights are "
             "shaped for its type), so the pattern follows the source layers, not the slot index.", "",
             "| attention type | slots | count |", "|---|---|---|"]
    lines += [f"| {kind} | {ranges(indices)} | {len(indices)} |" for kind, indices in by_type.items()]
    return lines + [""]


def _kv_section(manifest: StackManifest, arch: Architecture) -> list[str]:
    if arch.kv_sharing is None:
        return ["## KV sharing", "", f"Not applicable: `{arch.name}` has no cross-layer KV sharing; every slot "
                "computes its own K/V.", ""]
    slots = manifest.slots
    by_role: dict[str, list[int]] = {}
    for slot in slots:
        by_role.setdefault(slot.kv_role, []).append(slot.index)
    lines = ["## KV sharing", "", f"The trailing {manifest.num_kv_shared_layers} slots (`reuse`) compute no K/V "
             "and read the K/V of the last earlier `producer` slot of their attention type. `own` slots compute "
             "their own; `grafted` slots compute their own with k/v weights taken from another source layer, "
             "because their source layer was a KV consumer and had none.", "",
             "| KV role | slots | count |", "|---|---|---|"]
    lines += [f"| {role} | {ranges(indices)} | {len(indices)} |" for role, indices in by_role.items()]
    grafts = [slot for slot in slots if slot.kv_graft_from is not None]
    if not grafts:
        return lines + ["", "No slot needed grafted K/V.", ""]
    lines += ["", "Grafted K/V (`k_proj`, `v_proj`, `k_norm` copied from the donor layer):", "",
              "| slot | source layer | k/v donor layer | KV role |", "|---|---|---|---|"]
    lines += [f"| {s.index} | {s.source_layer} | {s.kv_graft_from} | {s.kv_role} |" for s in grafts]
    return lines + [""]


def _ple_section(arch: Architecture, text_config: dict, shapes: dict, manifest: StackManifest) -> list[str]:
    if not arch.layer_block_tensors:
        return ["## Per-layer embeddings (PLE)", "", f"Not applicable: `{arch.name}` has no per-layer embeddings.", ""]
    lines = ["## Per-layer embeddings (PLE)", "", "Each per-layer tensor holds one block per layer. Its blocks are "
             "re-sequenced like the layers: block i of the output is the source's block for slot i's source layer "
             "(the slot table above).", "", "| tensor | shape | block axis | block width | blocks |",
             "|---|---|---|---|---|"]
    source_layers, slots = manifest.source.num_hidden_layers, manifest.num_hidden_layers
    for spec in arch.layer_block_tensors:
        name = f"{arch.text_prefix}{spec.suffix}"
        if name in shapes:
            width = text_config[spec.block_size_field]
            lines.append(f"| `{name}` | {list(shapes[name])} | {spec.axis} | {width} | "
                         f"{source_layers} × {width} → {slots} × {width} |")
    return lines + [""]


def parameter_groups(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int]]:
    """(part, parameters) by the architecture's groups (first matching prefix wins; the rest is `other`)."""
    counts = {label: 0 for label, _ in arch.param_groups} | {"other": 0}
    for name, shape in shapes.items():
        label = next((label for label, prefixes in arch.param_groups if name.startswith(prefixes)), "other")
        counts[label] += math.prod(shape)
    return [(label, count) for label, count in counts.items() if count]


def _parameter_section(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    groups = parameter_groups(arch, shapes)
    total = sum(count for _, count in groups)
    lines = ["## Parameters", "", "Counted from the shapes in this folder's safetensors headers (tied weights are "
             "stored, and counted, once).", "", "| part | parameters | share |", "|---|---|---|"]
    lines += [f"| {label} | {count:,} ({human_count(count)}) | {100 * count / total:.1f}% |"
              for label, count in groups]
    return lines + [f"| total | {total:,} ({human_count(total)}) | 100.0% |", ""]


def _recipe_section(manifest: StackManifest, source: SourceFacts, out_dir: Path) -> list[str]:
    recipe_file = _repo_recipe(manifest.recipe)
    recipe_text = recipe_file.read_text() if recipe_file else yaml.safe_dump(manifest.recipe, sort_keys=False)
    recipe_arg = recipe_file.relative_to(REPO).as_posix() if recipe_file else "recipe.yaml"
    command = (f"python -m stack {recipe_arg} --source {source.command_source} "
               f"--out {display_path(Path(out_dir), placeholder=Path(out_dir).name)}")
    where = (f"`{recipe_arg}` in this project's repository" if recipe_file
             else "not a file of this project's repository; save it as `recipe.yaml` to rebuild")
    lines = ["## Recipe", "", f"The recipe ({where}):", "", "```yaml", recipe_text.rstrip("\n"), "```", "",
             "## Rebuild", "", "```", command, "```", ""]
    if source.hub_id is None:
        what = (f"`{source.command_source}`" if source.command_source == SOURCE_PLACEHOLDER
                else f"`{source.command_source}` (relative to this project's repository)")
        lines += [f"{what} is the local model folder the stack was made from; `stack.json` records the sha256 of "
                  "each of its shards, so a rebuild from another copy can be checked.", ""]
    return lines


def _repo_recipe(recipe: dict) -> Path | None:
    """The recipe file of this repository whose YAML equals the recorded recipe, if there is one."""
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        try:
            if yaml.safe_load(path.read_text()) == recipe:
                return path
        except yaml.YAMLError:
            continue
    return None


def _seed_section(manifest: StackManifest, arch: Architecture, shapes: dict) -> list[str]:
    """For the seed recipe's layer mapping: where the seed card (../shared/seed-model-card.txt) is wrong."""
    seed_layers = load_recipe(SEED_RECIPE).source_layers
    if [slot.source_layer for slot in manifest.slots] != seed_layers:
        return []
    full = [s.index for s in manifest.slots if s.attention_type == "full_attention"]
    rhythm = [i for i in range(len(seed_layers)) if i % SEED_CARD_RHYTHM == SEED_CARD_RHYTHM - 1]
    decoder = dict(parameter_groups(arch, shapes)).get("decoder layers", 0)
    types = (f"it keeps E4B's 5-sliding : 1-full rhythm by slot (full attention at slots {ranges(rhythm)}), but "
             "each slot keeps its source layer's type, so full attention sits at slots "
             f"{ranges(full)}" if full != rhythm else f"full attention sits at slots {ranges(full)}")
    return ["## Corrections to the seed card", "",
            f"Where the seed card of this recipe is wrong: {types}; and it gives the decoder layers "
            f"{human_count(int(SEED_CARD_DECODER_PARAMETERS))} parameters, but their shapes in this checkpoint hold "
            f"{decoder:,} ({human_count(decoder)}).", ""]


# ---- numbers ------------------------------------------------------------------------------------------------


def human_count(count: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


# ---- CLI ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", type=Path, help="a stack folder written by `python -m stack`")
    parser.add_argument("--source", help="the source it was stacked from (default: stack.json's source.model)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        model = args.source or load_manifest(args.stack).source.model
        directory = Path(model).expanduser()
        write_stack_card(args.stack, source_facts(model, directory if directory.is_dir() else None), args.stack)
    except (FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    logger.info("wrote %s", args.stack / CARD_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
