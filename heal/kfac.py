"""Eigen-subspace protection (`protection: kfac`): the LoRA update of a targeted Linear stays out of the source
model's leading K-FAC eigen-directions. With U [in, k] the protected input basis (leading eigenvectors of the input
second moment A) and V [out, k′] the protected output basis (of the output-gradient second moment G), the LoRA
factors act as A_lora (I − U Uᵀ) and (I − V Vᵀ) B_lora, so ΔW U = 0 and Vᵀ ΔW = 0.

`leading_subspace` picks U and V within the bases fisher_factors.safetensors stores, and `SubspaceProtection` is one
module's plan: projections inside the LoRA factors' forward, and the same projections baked into weights. Planning
(through stack.json) and the audit file are heal/protection.py's, shared with the coordinate masks.

See docs/architecture.md, section "Eigen-subspace protection: `protection: kfac`"; the bound the tests assert is
stated there ("Exactness").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fisher.factors import Eigenbasis, ModuleFactors

# Forward projections run in fp32 whatever the weights' dtype (bf16 under DeepSpeed); bakes, off the hot path,
# in float64, so a saved fp32 adapter holds the guarantee to its own roundoff.
FORWARD_DTYPE = torch.float32
BAKE_DTYPE = torch.float64


# ---- which directions --------------------------------------------------------------------------------------------


def leading_subspace(basis: Eigenbasis, energy_share: float, max_fraction: float) -> tuple[torch.Tensor, float]:
    """The fewest leading stored eigenvectors whose eigenvalues hold `energy_share` of the moment's trace (the
    stored `trace`, not the stored vectors' sum), at most floor(max_fraction · dim); all stored ones (capped) when
    they hold less. Returns them [dim, k] and the share of the trace they hold."""
    if basis.trace <= 0 or not len(basis.values):
        return basis.vectors[:, :0], 0.0
    cumulative = torch.cumsum(basis.values.double(), 0)
    needed = int(torch.searchsorted(cumulative, torch.tensor(energy_share * basis.trace, dtype=torch.float64))) + 1
    k = min(needed, len(basis.values), math.floor(max_fraction * basis.vectors.shape[0]))
    return basis.vectors[:, :k].contiguous(), float(cumulative[k - 1]) / basis.trace if k else 0.0


# ---- one module's plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubspaceProtection:
    """One module's protected bases; the same interface as heal.protection.ModuleProtection."""

    kind: ClassVar[str] = "kfac"
    input_basis: torch.Tensor  # U [in, k] fp32, orthonormal columns: ΔW U = 0
    output_basis: torch.Tensor  # V [out, k′] fp32, orthonormal columns: Vᵀ ΔW = 0
    input_energy_covered: float  # share of tr(A) the protected input eigenvalues hold
    output_energy_covered: float  # share of tr(G)

    @classmethod
    def select(cls, factors: ModuleFactors, energy_share: float, max_fraction: float) -> SubspaceProtection:
        inputs, input_energy = leading_subspace(factors.input, energy_share, max_fraction)
        outputs, output_energy = leading_subspace(factors.output, energy_share, max_fraction)
        return cls(inputs, outputs, input_energy, output_energy)

    @property
    def protected_dims(self) -> tuple[int, int]:
        """(k, k′): protected input and output directions."""
        return self.input_basis.shape[1], self.output_basis.shape[1]

    @property
    def covered(self) -> tuple[float, float]:
        return self.input_energy_covered, self.output_energy_covered

    def report(self, shape: tuple[int, int]) -> dict:
        return {"input_rank": self.protected_dims[0], "in_features": shape[1],
                "input_energy_covered": self.input_energy_covered,
                "output_rank": self.protected_dims[1], "out_features": shape[0],
                "output_energy_covered": self.output_energy_covered}

    def attach(self, lora_a: nn.Linear, lora_b: nn.Linear) -> None:
        """Project inside the factors' forward: A [r, in] acts as A (I − U Uᵀ), B [out, r] as (I − V Vᵀ) B."""
        _project_weight(lora_a, InputProjectedLinear, self.input_basis)
        _project_weight(lora_b, OutputProjectedLinear, self.output_basis)

    def bake(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """The same projections, in place, on the weights (live parameters or a saved adapter's tensors)."""
        lora_a.copy_(without_input_subspace(lora_a, self.input_basis.to(lora_a.device), BAKE_DTYPE))
        lora_b.copy_(without_output_subspace(lora_b, self.output_basis.to(lora_b.device), BAKE_DTYPE))

    def audit_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.input_basis": self.input_basis.contiguous(),
                f"{module}.output_basis": self.output_basis.contiguous()}

    @classmethod
    def from_audit(cls, tensors, module: str, entry: dict) -> SubspaceProtection:
        """`tensors`: an open safetensors file (get_tensor); `entry`: the module's report."""
        return cls(tensors.get_tensor(f"{module}.input_basis"), tensors.get_tensor(f"{module}.output_basis"),
                   entry["input_energy_covered"], entry["output_energy_covered"])

    def difference(self, other: SubspaceProtection) -> str | None:
        """Which protected eigenvectors differ from `other`'s ('input eigenvectors' or 'output eigenvectors'),
        or None."""
        if not torch.equal(self.input_basis, other.input_basis):
            return "input eigenvectors"
        if not torch.equal(self.output_basis, other.output_basis):
            return "output eigenvectors"
        return None


# ---- the projections -------------------------------------------------------------------------------------------


def without_input_subspace(weight: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W − (W U) Uᵀ for W [r, in], U [in, k], computed in `dtype`, returned in W's dtype."""
    w, u = weight.to(dtype), basis.to(dtype)
    return (w - (w @ u) @ u.T).to(weight.dtype)


def without_output_subspace(weight: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W − V (Vᵀ W) for W [out, r], V [out, k′], computed in `dtype`, returned in W's dtype."""
    w, v = weight.to(dtype), basis.to(dtype)
    return (w - v @ (v.T @ w)).to(weight.dtype)


class InputProjectedLinear(nn.Linear):
    """A LoRA A factor [r, in] whose forward uses A (I − U Uᵀ), U = protected_basis [in, k].

    Projecting the r×in weight (2·r·in·k flops) costs far less than projecting activations, and it happens inside
    forward, where DeepSpeed has gathered ZeRO-3 partitions. The basis is a non-persistent fp32 buffer (DeepSpeed
    keeps fp32 buffers under bf16): state_dict and PEFT's adapter files are unchanged. The gradient reaching A is
    projected too, but AdamW's per-entry scaling does not keep A itself out of span(U): the forward's projection
    is what holds the function, and the bake is what makes the saved weights hold it.
    """

    protected_basis: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = without_input_subspace(self.weight, self.protected_basis, FORWARD_DTYPE)
        return nn.functional.linear(x, weight, self.bias)


class OutputProjectedLinear(nn.Linear):
    """A LoRA B factor [out, r] whose forward uses (I − V Vᵀ) B, V = protected_basis [out, k′]
    (as InputProjectedLinear)."""

    protected_basis: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = without_output_subspace(self.weight, self.protected_basis, FORWARD_DTYPE)
        return nn.functional.linear(x, weight, self.bias)


def _project_weight(linear: nn.Linear, projected_class: type[nn.Linear], basis: torch.Tensor) -> None:
    linear.__class__ = projected_class  # same parameters and names; only forward changes
    linear.register_buffer("protected_basis", basis.to(linear.weight.device, FORWARD_DTYPE), persistent=False)
