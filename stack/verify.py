"""Check a written stack against its source, tensor by tensor, from stack.json alone.

    python -m stack.verify out/gemma-4-E6B-it-raw [--source DIR] [--load]

Exit status: 0 when every tensor matches, 1 when one differs (named in the log), 2 for bad input. What is
compared and --load: docs/architecture.md, section "The stacker (`stack/`)"; time and memory on the full-size
E6B: docs/benchmarks.md, section "Stacker".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from core.checkpoint import SourceCheckpoint, open_source
from core.cli import setup_logging

from .manifest import StackManifest, check_manifest_matches_config, load_manifest

logger = logging.getLogger(__name__)

ROWS_PER_BLOCK = 4096  # rows compared at once for tensors larger than this


class VerifyError(AssertionError):
    pass


def verify_tensors(out_dir: Path, source: SourceCheckpoint) -> int:
    """Raise VerifyError at the first output tensor that differs from its mapped source; return the count."""
    manifest = load_manifest(out_dir)
    check_manifest_matches_config(out_dir, manifest)  # a stale stack.json is bad input (ManifestError), not a diff
    arch, slots = manifest.arch, manifest.slots
    block_tensors = {f"{arch.text_prefix}{b.suffix}": b for b in arch.layer_block_tensors}
    weight_map = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with ExitStack() as files:
        handles = {}

        def tensor(path: Path, name: str):
            if path not in handles:
                handles[path] = files.enter_context(safe_open(path, "pt"))
            return handles[path].get_slice(name)

        for name, shard in weight_map.items():
            got = tensor(out_dir / shard, name)
            source_name = name if name in block_tensors else _source_name(manifest, name)
            if source_name not in source.tensors:
                raise VerifyError(f"{name}: mapped source tensor {source_name!r} is not in {source.model!r}")
            want = tensor(source.tensors[source_name].path, source_name)
            if name in block_tensors:
                axis = block_tensors[name].axis
                width = got.get_shape()[axis] // len(slots)
                for slot in slots:
                    starts = (slot.index * width, slot.source_layer * width)
                    _compare_block(got, want, axis, starts, width, f"{name} block of slot {slot.index}")
            else:
                _compare_whole(got, want, f"{name} vs source {source_name}")
    return len(weight_map)


def _source_name(manifest: StackManifest, name: str) -> str:
    prefix = manifest.layer_prefix
    if not name.startswith(prefix):
        return name
    index, suffix = name[len(prefix):].split(".", 1)
    return f"{prefix}{manifest.source_layer_of(manifest.slots[int(index)], suffix)}.{suffix}"


def _row_blocks(shape: list[int]) -> list[slice]:
    return [slice(r, r + ROWS_PER_BLOCK) for r in range(0, shape[0], ROWS_PER_BLOCK)] if shape else [Ellipsis]


def _compare_whole(got, want, what: str) -> None:
    if got.get_shape() != want.get_shape():
        raise VerifyError(f"{what}: shape {got.get_shape()} != {want.get_shape()}")
    for rows in _row_blocks(got.get_shape()):
        _equal(got[rows], want[rows], what)


def _compare_block(got, want, axis: int, starts: tuple[int, int], width: int, what: str) -> None:
    """Block `width` wide at starts[0] of `got` against the block at starts[1] of `want`, along axis 0 or 1."""
    out_block, src_block = slice(starts[0], starts[0] + width), slice(starts[1], starts[1] + width)
    if axis == 0:
        _equal(got[out_block], want[src_block], what)
        return
    for rows in _row_blocks(got.get_shape()):
        _equal(got[rows, out_block], want[rows, src_block], what)


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # Bitwise, so NaN payloads and -0.0 count as the bytes they are.
    same_bytes = (a.dtype == b.dtype and a.shape == b.shape
                  and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if not same_bytes:
        raise VerifyError(f"{what}: the bytes differ")


def verify_loads(out_dir: Path, prompt_ids: list[int]) -> list[int]:
    """Load with transformers, require a clean load, and return greedy continuation token ids."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise VerifyError(f"{out_dir} does not load cleanly: {problems}")
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack_dir", type=Path, help="a folder written by `python -m stack`")
    parser.add_argument("--source", help="source model folder or hub id (default: the one recorded in stack.json)")
    parser.add_argument("--load", action="store_true",
                        help="also load with transformers and generate (needs RAM for the model)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        source = open_source(args.source or load_manifest(args.stack_dir).source.model)
        count = verify_tensors(args.stack_dir, source)
        logger.info("all %d tensors equal their mapped source tensors", count)
        if args.load:
            continuation = verify_loads(args.stack_dir, [2, 10, 20])
            logger.info("loads cleanly; greedy continuation of [2, 10, 20]: %s", continuation)
    except VerifyError as error:  # the check ran and failed: the stack differs from its source
        logger.error("%s", error)
        return 1
    except (FileNotFoundError, ValueError) as error:  # bad input (no folder, no stack.json, bad source), as every CLI
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
