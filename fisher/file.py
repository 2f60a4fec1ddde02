"""The Fisher file, fisher.safetensors: its name, its metadata, and its reader.

One fp32 tensor per decoder Linear weight, named and shaped as in the source checkpoint; the run's
metadata is JSON under the safetensors metadata key METADATA_KEY. The format is documented in
docs/architecture.md ("The Fisher file"). fisher/__main__.py writes it; heal/ reads it through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FISHER_FILE = "fisher.safetensors"
METADATA_KEY = "fisher"  # safetensors metadata key holding the run's metadata as JSON
FORMAT_VERSION = 1


class FisherFileError(ValueError):
    pass


def read_fisher_metadata(path: str | Path) -> dict[str, Any]:
    """The run's metadata (header only: no tensor data is read), with its format_version checked."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FisherFileError(f"Fisher file {path} does not exist; compute it with `python -m fisher` (make fisher)")
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as error:  # safetensors raises its own error type for a bad header
        raise FisherFileError(f"Fisher file {path} cannot be read ({error}); compute it again with "
                              "`python -m fisher`") from None
    if raw is None:
        raise FisherFileError(f"Fisher file {path} has no {METADATA_KEY!r} metadata: it was not written by "
                              "`python -m fisher`; compute it again")
    metadata = json.loads(raw)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise FisherFileError(f"Fisher file {path} has format_version {metadata.get('format_version')!r}; this code "
                              f"reads {FORMAT_VERSION}. Compute it again with this version of `python -m fisher`")
    return metadata


def load_fisher(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a Fisher file; every entry must be finite and >= 0 (a mean of squares)."""
    from safetensors.torch import load_file

    metadata = read_fisher_metadata(path)
    try:
        tensors = load_file(path)
    except Exception as error:  # truncated data
        raise FisherFileError(f"Fisher file {path} cannot be read ({error}); compute it again with "
                              "`python -m fisher`") from None
    for name, values in sorted(tensors.items()):
        check_fisher_values(name, values, path)
    return tensors, metadata


def check_fisher_values(name: str, values: torch.Tensor, path: str | Path) -> None:
    bad_kind = "NaN or infinite" if not torch.isfinite(values).all() else "negative" if (values < 0).any() else None
    if bad_kind:
        raise FisherFileError(f"Fisher file {path}: tensor {name!r} has {bad_kind} entries; a Fisher is a mean of "
                              "squared gradients (finite, >= 0). Compute it again with `python -m fisher`")
