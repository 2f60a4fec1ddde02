"""File formats every stage reads or writes: a file's sha256, JSONL rows, and safetensors headers.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header giving each tensor's
dtype, shape and byte range; reading it reads no tensor data, so a 16 GB checkpoint's headers are a few megabytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def sha256_file(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """The hex sha256 of a file's bytes, read `chunk_bytes` at a time (a weight shard is several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---- JSONL ---------------------------------------------------------------------------------------------------


class JsonlError(ValueError):
    """A JSONL file that is missing, holds no rows, or has a line that is not a JSON object. `line` (counted from 1;
    None when the whole file is at fault) and `problem` let a caller word the error in its own terms."""

    def __init__(self, path: Path, problem: str, line: int | None = None):
        super().__init__(f"{path}: {problem}" if line is None else f"{path} line {line}: {problem}")
        self.line, self.problem = line, problem


def numbered_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number counted from 1, parsed JSON value) for each non-blank line of a JSONL file, for callers that
    check the rows themselves and name a bad one by its line. A line that is not JSON raises JsonlError."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise JsonlError(path, f"not valid JSON ({error.msg} at column {error.colno})", number) from None
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, in order (blank lines skipped). A missing file, a line that is not a JSON
    object, or a file without rows raises JsonlError naming the file and the line."""
    if not Path(path).is_file():
        raise JsonlError(path, "no such file")
    rows = []
    for number, row in numbered_jsonl(path):
        if not isinstance(row, dict):
            raise JsonlError(path, f"expected a JSON object, got {type(row).__name__}", number)
        rows.append(row)
    if not rows:
        raise JsonlError(path, "no rows")
    return rows


def jsonl_text(rows: Iterable[dict]) -> str:
    """Rows as JSONL: one compact JSON object per line, non-ASCII characters kept as they are."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ---- safetensors headers -------------------------------------------------------------------------------------


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor's data: elements times the size of its safetensors dtype."""
    return math.prod(shape) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path  # shard holding it (read remotely: where the shard would sit beside config.json; never opened)
    # Absolute byte offset of its data in `path`. None when read remotely: the hub API gives offsets within the
    # data section but not the header's length, and a remote tensor's bytes are never read.
    offset: int | None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


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
        end = offset + tensor_nbytes(dtype, shape)
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
