"""Execute a StackPlan: stream bytes from the source shards into new safetensors shards.

Memory stays bounded whatever the model size. Whole tensors and contiguous blocks are copied
file-to-file by the kernel (copy_file_range), never through Python. Only a GatherBlocks along an
inner axis (the PLE table, [vocab, L*256]) passes through memory, one block of rows at a time
(CHUNK_BYTES of source rows). Everything is written into a temp folder beside OUT, which is
renamed to OUT only once complete; on any error the temp folder is removed and OUT is untouched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from core.cards import CARD_NAME, source_facts
from core.checkpoint import SourceCheckpoint, SourceError, check_data_present
from core.files import DTYPE_BYTES, encode_safetensors_header, sha256_file
from core.outputs import MARKER_NAME, guard_output_dir, staged_output

from .card import write_stack_card
from .manifest import MANIFEST_NAME, manifest_from_plan
from .plan import Copy, GatherBlocks, OutputTensor, StackPlan

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20  # source bytes per row block of a GatherBlocks along an inner axis


def write_stack(plan: StackPlan, source: SourceCheckpoint, out_dir: Path, force: bool = False) -> None:
    out_dir = Path(out_dir)
    check_output_dir(out_dir, source, force)
    check_data_present(source)
    with staged_output(out_dir, stage="stack") as tmp, ThreadPoolExecutor(max_workers=1) as hasher:
        # Hash the source shards on a second thread while the first writes (hashlib releases the GIL).
        digests = {shard.name: hasher.submit(sha256_file, shard) for shard in source.shards}
        shard_names = _write_shards(plan, tmp)
        _write_index(plan, shard_names, tmp)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        copied = copy_source_files(source.directory, tmp)
        logger.info("copied %d tokenizer/processor/generation files: %s", len(copied), ", ".join(copied))
        logger.info("waiting for source shard hashes")
        manifest = manifest_from_plan(plan, {name: f.result() for name, f in digests.items()})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        # The model card, from the files just written (stack.json, config.json, the shards' headers).
        write_stack_card(tmp, source_facts(source.model, source.directory), out_dir)
    logger.info("wrote %s (model card: %s)", out_dir, out_dir / CARD_NAME)


def check_output_dir(out_dir: Path, source: SourceCheckpoint, force: bool) -> None:
    """Never write into or over the source, and replace only an earlier stack unless --force."""
    out, src = out_dir.resolve(), source.directory.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise FileExistsError(f"output {out_dir} overlaps the source folder {source.directory}; choose another --out")
    guard_output_dir(out_dir, "stack", force)


def copy_source_files(directory: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, chat template, processor and generation files: everything that is not weights,
    the weight index, config.json (rewritten by the stacker), the source's model card or its output marker."""
    skip_names = {"config.json", "model.safetensors.index.json", "README.md", ".gitattributes", MARKER_NAME}
    copied = []
    for path in sorted(directory.iterdir()):
        is_weights = path.suffix in {".safetensors", ".bin", ".pt", ".gguf"}
        if path.is_file() and path.name not in skip_names and not is_weights:
            shutil.copyfile(path, out_dir / path.name)  # follows the HF cache's symlinks to the blobs
            copied.append(path.name)
    return copied


def shard_file_names(num_shards: int) -> list[str]:
    return [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]


def _write_shards(plan: StackPlan, tmp: Path) -> list[str]:
    names = shard_file_names(len(plan.shards))
    with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="stacking", dynamic_ncols=True) as progress:
        for name, shard in zip(names, plan.shards):
            _write_shard(tmp / name, shard, progress.update)
    return names


def _write_shard(path: Path, tensors: tuple[OutputTensor, ...], advance: Callable[[int], object]) -> None:
    with open(path, "wb") as out:
        out.write(encode_safetensors_header([(t.name, t.dtype, t.shape) for t in tensors]))
        for tensor in tensors:
            expected_end = out.tell() + tensor.nbytes
            _execute(tensor, out)
            if out.tell() != expected_end:
                raise RuntimeError(f"internal: wrote {out.tell() - expected_end + tensor.nbytes} bytes for "
                                   f"{tensor.name}, planned {tensor.nbytes}")
            advance(tensor.nbytes)
        out.flush()
        os.fsync(out.fileno())


def _execute(tensor: OutputTensor, out) -> None:
    op = tensor.op
    if isinstance(op, Copy):
        _copy_range(op.source.path, op.source.offset, op.source.nbytes, out)
    elif isinstance(op, GatherBlocks):
        _gather_blocks(op, out)
    else:
        raise TypeError(f"internal: unknown op {op!r} for {tensor.name}")


def _copy_range(path: Path, offset: int, length: int, out) -> None:
    """Append `length` bytes of `path` from `offset` to `out`, in the kernel where it can."""
    out.flush()
    with open(path, "rb") as src:
        try:
            while length:
                sent = os.copy_file_range(src.fileno(), out.fileno(), length, offset)
                if sent == 0:
                    raise SourceError(f"{path} ended before byte {offset + length}; the shard is truncated")
                offset += sent
                length -= sent
        except OSError:  # e.g. EXDEV on old kernels, or a filesystem without support: plain reads
            while length:
                chunk = os.pread(src.fileno(), min(length, CHUNK_BYTES), offset)
                if not chunk:
                    raise SourceError(f"{path} ended before byte {offset + length}; the shard is truncated") from None
                out.write(chunk)
                offset += len(chunk)
                length -= len(chunk)
    out.seek(0, os.SEEK_END)


def _gather_blocks(op: GatherBlocks, out) -> None:
    """Output = source blocks op.indices, in order, along op.axis.

    View the source as [outer, L, block·inner] bytes (outer = product of dims before axis,
    inner = bytes of one index along axis): each output row is L' gathered blocks of one source row.
    """
    import torch

    shape, src = op.source.shape, op.source
    element = DTYPE_BYTES[src.dtype]
    outer = math.prod(shape[: op.axis])
    block_bytes = op.block * math.prod(shape[op.axis + 1:]) * element
    num_blocks = shape[op.axis] // op.block
    row_bytes = num_blocks * block_bytes
    if outer == 1:  # blocks are contiguous byte ranges: copy each in the kernel
        for index in op.indices:
            _copy_range(src.path, src.offset + index * block_bytes, block_bytes, out)
        return
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    indices = torch.tensor(op.indices)
    with open(src.path, "rb") as f:
        for row in range(0, outer, rows_per_chunk):
            rows = min(rows_per_chunk, outer - row)
            raw = bytearray(rows * row_bytes)
            f.seek(src.offset + row * row_bytes)
            if f.readinto(raw) != len(raw):
                raise SourceError(f"{src.path} ended inside tensor {src.name}; the shard is truncated")
            blocks = torch.frombuffer(raw, dtype=torch.uint8).view(rows, num_blocks, block_bytes)
            out.write(blocks.index_select(1, indices).numpy().data)  # [rows, L', block_bytes], contiguous


def _write_index(plan: StackPlan, shard_names: list[str], tmp: Path) -> None:
    weight_map = {tensor.name: name for name, shard in zip(shard_names, plan.shards) for tensor in shard}
    index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
