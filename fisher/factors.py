"""The K-FAC factors file, fisher_factors.safetensors: the top eigenvectors of each decoder Linear's input and
output-gradient second moments, written beside fisher.safetensors (`factors: true`), read by the heal's
`protection: kfac`. Format: docs/architecture.md, section "The K-FAC factors file".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisher.file import METADATA_KEY

FACTORS_FILE = "fisher_factors.safetensors"
FACTORS_FORMAT_VERSION = 1
# Tensor names: f"{module}.{side}_{part}", side in SIDES, part in ("vectors", "values").
SIDES = ("input", "output")


class FactorsFileError(ValueError):
    pass


@dataclass(frozen=True)
class Eigenbasis:
    """The leading eigenvectors of a symmetric PSD second moment M [dim, dim]."""

    vectors: torch.Tensor  # [dim, k] fp32, orthonormal columns, by decreasing eigenvalue
    values: torch.Tensor  # [k] fp32, decreasing, >= 0
    trace: float  # tr(M): values.sum() / trace is the energy the basis captures

    @property
    def energy(self) -> float:
        return float(self.values.double().sum()) / self.trace if self.trace > 0 else 0.0


@dataclass(frozen=True)
class ModuleFactors:
    input: Eigenbasis  # of A = Σ x xᵀ over tokens (in × in)
    output: Eigenbasis  # of G = Σ g gᵀ over tokens (out × out), g = ∂ℓ/∂y


def top_eigenbasis(moment: torch.Tensor, energy_share: float, max_rank: int) -> Eigenbasis:
    """The fewest leading eigenvectors of `moment` whose eigenvalues hold `energy_share` of its trace, at most
    `max_rank`. The decomposition runs in float64: the small eigenvalues of a fp32 Gram matrix are noise."""
    values, vectors = torch.linalg.eigh(moment.double())  # ascending
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    trace = float(values.sum())
    if trace <= 0:
        return Eigenbasis(vectors[:, :0].float(), values[:0].float(), 0.0)
    cumulative = torch.cumsum(values, 0)
    needed = int(torch.searchsorted(cumulative, cumulative.new_tensor(energy_share * trace))) + 1  # on its device
    k = min(needed, max_rank, len(values))
    return Eigenbasis(vectors[:, :k].float().contiguous(), values[:k].float().contiguous(), trace)


def save_factors(path: str | Path, factors: dict[str, ModuleFactors], metadata: dict[str, Any]) -> None:
    """Write `factors` to `path` (inside the Fisher stage's staged output folder); `metadata` gains the format
    version and each basis' trace."""
    from safetensors.torch import save_file

    tensors, traces = {}, {}
    for module, module_factors in sorted(factors.items()):
        for side in SIDES:
            basis: Eigenbasis = getattr(module_factors, side)
            tensors[f"{module}.{side}_vectors"] = basis.vectors
            tensors[f"{module}.{side}_values"] = basis.values
            traces[f"{module}.{side}"] = basis.trace
    metadata = {**metadata, "format_version": FACTORS_FORMAT_VERSION, "traces": traces}
    save_file(tensors, Path(path), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})


def load_factors(path: str | Path) -> tuple[dict[str, ModuleFactors], dict[str, Any]]:
    """(factors by module name, metadata); the format version, every module's four tensors, their shapes and
    the bases' orthonormality are checked, and any failure names the file and the tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FactorsFileError(f"factors file {path} does not exist; compute it with `python -m fisher` and "
                               "`factors: true` in the Fisher recipe")
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error type for a bad header or truncated data
        raise FactorsFileError(f"factors file {path} cannot be read ({error}); compute it again") from None
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format_version") != FACTORS_FORMAT_VERSION:
        raise FactorsFileError(f"factors file {path} has format_version {metadata.get('format_version')!r}; this "
                               f"code reads {FACTORS_FORMAT_VERSION}. Compute it again with `python -m fisher`")
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors})
    traces = metadata.get("traces", {})  # missing: each module's trace is reported missing by name
    return {module: _module_factors(path, module, tensors, traces) for module in modules}, metadata


def _module_factors(path: Path, module: str, tensors: dict[str, torch.Tensor], traces: dict) -> ModuleFactors:
    bases = {}
    for side in SIDES:
        names = (f"{module}.{side}_vectors", f"{module}.{side}_values")
        missing = [name for name in names if name not in tensors]
        if missing or f"{module}.{side}" not in traces:
            raise FactorsFileError(f"factors file {path}: {missing or module + '.' + side + ' trace'} missing; "
                                   "compute it again with `python -m fisher`")
        vectors, values = (tensors[name] for name in names)
        if vectors.ndim != 2 or values.shape != (vectors.shape[1],):
            raise FactorsFileError(f"factors file {path}: {names[0]} {list(vectors.shape)} and {names[1]} "
                                   f"{list(values.shape)} do not form a basis ([dim, k] and [k])")
        gram = vectors.double().T @ vectors.double()
        if not torch.allclose(gram, torch.eye(len(values), dtype=torch.float64), atol=1e-4):
            raise FactorsFileError(f"factors file {path}: {names[0]} has columns that are not orthonormal "
                                   f"(|VᵀV − I|max = {float((gram - torch.eye(len(values))).abs().max()):.2e})")
        if not math.isfinite(traces[f"{module}.{side}"]) or not torch.isfinite(values).all():
            raise FactorsFileError(f"factors file {path}: {module}.{side} has non-finite values")
        bases[side] = Eigenbasis(vectors.float(), values.float(), float(traces[f"{module}.{side}"]))
    return ModuleFactors(**bases)
