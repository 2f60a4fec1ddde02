"""The source checkpoint: resolved from a local folder or the HF hub cache, read lazily.

Only safetensors headers are parsed here (8-byte little-endian header length, then a JSON header
giving each tensor's dtype, shape and byte range). Tensor data is never read in this module, so a
dry run of the 16 GB E4B touches a few megabytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

# Files fetched from the hub: config, weights, tokenizer, chat template and processor files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "LICENSE*"]


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path  # shard holding it
    offset: int  # absolute byte offset of its data in `path`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class SourceCheckpoint:
    model: str  # as the user named it: hub id or path
    directory: Path
    config: dict[str, Any]  # config.json, as raw JSON
    tensors: dict[str, TensorInfo]
    shards: tuple[Path, ...]


def open_source(model: str) -> SourceCheckpoint:
    directory = resolve_source(model)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SourceError(f"source {model!r} ({directory}) has no config.json; point --source at a HF model folder")
    shards = _find_shards(directory, model)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                raise SourceError(f"tensor {name!r} of model {model!r} appears in both {tensors[name].path.name} and {shard.name}")
            tensors[name] = info
    return SourceCheckpoint(model, directory, json.loads(config_path.read_text()), tensors, tuple(shards))


def check_data_present(source: SourceCheckpoint) -> None:
    """Every tensor's bytes lie inside its shard (a stat per shard; no data is read)."""
    for shard in source.shards:
        size = shard.stat().st_size
        for info in source.tensors.values():
            if info.path == shard and info.offset + info.nbytes > size:
                raise SourceError(
                    f"shard {shard} of model {source.model!r} is truncated: tensor {info.name!r} ends at byte "
                    f"{info.offset + info.nbytes}, the file has {size}. Re-download the model"
                )


def resolve_source(model: str) -> Path:
    """A local folder as-is; otherwise a hub id, downloaded or taken from the local HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise SourceError(f"source folder {model!r} does not exist; pass an existing HF model folder with --source")
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as online_error:  # offline, no such repo, gated, network down: all fall back to the cache
        logger.info("hub download of %s failed (%s); trying the local HF cache", repo_id, online_error)
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise SourceError(
                f"model {repo_id!r} could not be fetched from the hub ({str(online_error).splitlines()[0]}) "
                "and is not in the local HF cache. Download it on a machine with access "
                f"(`hf download {repo_id} --local-dir DIR`), then pass the folder: "
                "`make raw SOURCE=DIR` / `python -m stack RECIPE --source DIR`, or `make fisher MODEL=DIR`."
            ) from None


def _find_shards(directory: Path, model: str) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise SourceError(f"model {model!r}: index names shard(s) {missing} that are not in {directory}")
        return shards
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise SourceError(f"model {model!r} ({directory}) has no model.safetensors or model.safetensors.index.json; "
                      "the stacker reads safetensors only (re-save the model with save_pretrained)")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor dtypes, shapes and absolute byte offsets of one shard, from its header alone."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    header.pop("__metadata__", None)
    return {
        name: TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path, data_start + meta["data_offsets"][0])
        for name, meta in header.items()
    }


def encode_safetensors_header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The header for (name, dtype, shape) tensors stored back to back in this order: 8-byte
    little-endian length, then JSON, space-padded so the data starts 8-byte aligned."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        end = offset + math.prod(shape) * DTYPE_BYTES[dtype]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def sha256_file(path: Path, chunk_bytes: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def copy_source_files(directory: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, chat template, processor and generation files: everything that is not weights,
    the weight index, config.json (rewritten by the stacker) or the source's model card."""
    skip_names = {"config.json", "model.safetensors.index.json", "README.md", ".gitattributes"}
    copied = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in skip_names and path.suffix not in {".safetensors", ".bin", ".pt", ".gguf"}:
            shutil.copyfile(path, out_dir / path.name)  # follows the HF cache's symlinks to the blobs
            copied.append(path.name)
    return copied
