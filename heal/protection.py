"""Fisher-subspace protection: the LoRA update of a targeted Linear never moves the source model's
high-Fisher input and output coordinates. `slot_fisher` maps the source's Fisher onto the stack's slots,
`plan_protection` picks the coordinates, `attach` masks them inside the LoRA factors' forward, and `bake`
zeroes them in the saved adapter.

See docs/architecture.md, section "The heal (`heal/`)".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stack.manifest import StackManifest

logger = logging.getLogger(__name__)

PROTECTION_FILE = "protection.safetensors"


class ProtectionError(ValueError):
    pass


@dataclass(frozen=True)
class ProtectionConfig:
    mass_share: float = 0.75  # protect the fewest coordinates holding this share of a module's Fisher mass
    max_fraction: float = 0.25  # ... but never more than this fraction of its input (or output) dimensions
    first_copy_only: bool = False  # protect only the first slot holding a duplicated source layer

    def __post_init__(self):
        for name in ("mass_share", "max_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ProtectionError(f"protection {name} must be in (0, 1), got {value}")


@dataclass(frozen=True)
class ModuleProtection:
    inputs: torch.Tensor  # protected input coordinates (int64, sorted)
    outputs: torch.Tensor  # protected output coordinates (int64, sorted)
    input_mass_covered: float  # share of the module's Fisher mass on the protected input coordinates
    output_mass_covered: float

    def report(self, shape: tuple[int, int]) -> dict:
        return {"protected_inputs": len(self.inputs), "in_features": shape[1],
                "input_mass_covered": self.input_mass_covered,
                "protected_outputs": len(self.outputs), "out_features": shape[0],
                "output_mass_covered": self.output_mass_covered}


# ---- Fisher onto slots ------------------------------------------------------------------------------------


def slot_fisher(fisher: dict[str, torch.Tensor], manifest: StackManifest,
                first_copy_only: bool = False) -> dict[str, torch.Tensor]:
    """Fisher keyed by source-layer weight names -> keyed by the stack's weight names.

    Grafted K/V weights (a slot's k/v taken from another layer) get no entry: their source layer had
    none, and the donor's Fisher measures another layer's use of them.
    """
    prefix = manifest.layer_prefix
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, values in fisher.items():
        if not name.startswith(prefix):
            raise ProtectionError(f"Fisher tensor {name!r} is not under the stack's layer prefix {prefix!r}; "
                                  f"was it computed on {manifest.source.model!r}?")
        layer, suffix = name[len(prefix):].split(".", 1)
        by_layer.setdefault(int(layer), {})[suffix] = values
    out, seen = {}, set()
    for slot in manifest.slots:
        layer = slot.source_layer
        if first_copy_only and layer in seen:
            continue
        seen.add(layer)
        for suffix, values in by_layer.get(layer, {}).items():
            if not manifest.is_grafted_kv(slot, suffix):
                out[f"{prefix}{slot.index}.{suffix}"] = values
    return out


def check_fisher_matches(fisher: dict[str, torch.Tensor], source_shapes: dict[str, tuple[int, ...]],
                         source_model: str) -> None:
    """Every Fisher tensor must name a weight of the stack's source model, with its shape."""
    for name, values in sorted(fisher.items()):
        if name not in source_shapes:
            raise ProtectionError(f"Fisher tensor {name!r} is not a weight of the stack's source {source_model!r}; "
                                  "compute the Fisher on the model the stack was built from")
        if tuple(values.shape) != tuple(source_shapes[name]):
            raise ProtectionError(f"Fisher tensor {name!r} has shape {list(values.shape)} but {source_model!r} has "
                                  f"{list(source_shapes[name])}; the Fisher comes from a different model")


def check_fisher_provenance(fisher_path: str | Path, fisher_metadata: dict, manifest_path: str | Path,
                            manifest: StackManifest, allow_other_source: bool = False) -> None:
    """The Fisher must come from the stack's source checkpoint: the same shard files with the same sha256.
    Shapes cannot tell a base model from its instruction-tuned sibling (gemma-4-E4B vs E4B-it); the
    hashes that fisher and the stacker each recorded can. `allow_other_source` downgrades a mismatch to a warning."""
    recorded = fisher_metadata.get("model_shard_sha256") or {}
    difference = _first_shard_difference(recorded, manifest.source.shard_sha256)
    if difference is None:
        return
    message = (f"{fisher_path} was computed on {fisher_metadata.get('model')!r}, but {manifest_path} was stacked from "
               f"{manifest.source.model!r}, and their source shards differ ({difference})")
    if allow_other_source:
        logger.warning("%s; protecting with it anyway (fisher_allow_other_source: true)", message)
        return
    raise ProtectionError(f"{message}. Compute the Fisher on the stack's source model, or set "
                          "fisher_allow_other_source: true if you mean to protect with another model's Fisher")


def _first_shard_difference(fisher_shards: dict[str, str], stack_shards: dict[str, str]) -> str | None:
    """'shard NAME: the Fisher's sha256 …, stack.json's …' for the first shard (by name) whose hash differs,
    or None (hashes shortened to 16 hex digits)."""
    for name in sorted(set(fisher_shards) | set(stack_shards)):
        ours, theirs = fisher_shards.get(name), stack_shards.get(name)
        if ours != theirs:
            ours, theirs = (ours or "absent")[:16], (theirs or "absent")[:16]
            return f"shard {name}: the Fisher's sha256 {ours}, stack.json's {theirs}"
    return None


# ---- which coordinates --------------------------------------------------------------------------------------


def protected_coordinates(marginal: torch.Tensor, mass_share: float,
                          max_fraction: float) -> tuple[torch.Tensor, float]:
    """The fewest highest-mass coordinates holding `mass_share` of `marginal`'s total, capped at
    floor(max_fraction · n); returns them sorted, and the share of mass they hold."""
    marginal = marginal.double()
    total = float(marginal.sum())
    if total <= 0:
        return torch.empty(0, dtype=torch.long), 0.0
    order = torch.argsort(marginal, descending=True)
    cumulative = torch.cumsum(marginal[order], 0)
    needed = int(torch.searchsorted(cumulative, torch.tensor(mass_share * total, dtype=torch.float64))) + 1
    count = min(needed, math.floor(max_fraction * marginal.numel()))
    chosen = order[:count]
    return torch.sort(chosen).values, float(marginal[chosen].sum()) / total


def plan_protection(fisher: dict[str, torch.Tensor], module_names: list[str],
                    config: ProtectionConfig) -> dict[str, ModuleProtection]:
    """Protected coordinates of each targeted module (by module name) that has a Fisher."""
    plan = {}
    for module in module_names:
        values = fisher.get(f"{module}.weight")
        if values is None:
            continue
        inputs, input_share = protected_coordinates(values.sum(0), config.mass_share, config.max_fraction)
        outputs, output_share = protected_coordinates(values.sum(1), config.mass_share, config.max_fraction)
        plan[module] = ModuleProtection(inputs, outputs, input_share, output_share)
    return plan


# ---- enforcing it on PEFT LoRA layers ----------------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """A LoRA factor (A [r, in] or B [out, r]) whose forward uses weight ⊙ weight_mask.

    Masking the weight (r·in or out·r entries) costs far less than masking activations (tokens ·
    in or tokens · out), and it happens inside forward, where DeepSpeed has gathered ZeRO-3
    partitions. The mask is a non-persistent buffer: state_dict and PEFT's adapter files are unchanged.
    """

    weight_mask: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.weight_mask, self.bias)


def _mask_weight(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.__class__ = MaskedLinear  # same parameters and names; only forward changes
    linear.register_buffer("weight_mask", mask.to(linear.weight.dtype), persistent=False)


def attach(model: nn.Module, plan: dict[str, ModuleProtection], adapter: str = "default") -> None:
    """Mask the protected coordinates in every planned LoRA layer's forward: A's protected input
    columns and B's protected output rows never act, so ΔW e_k = 0 and e_oᵀ ΔW = 0."""
    for name, lora_layer in _lora_layers(model, plan):
        protection = plan[name]
        lora_a, lora_b = lora_layer.lora_A[adapter], lora_layer.lora_B[adapter]
        keep_inputs = torch.ones(lora_layer.in_features, device=lora_a.weight.device)
        keep_inputs[protection.inputs.to(keep_inputs.device)] = 0
        keep_outputs = torch.ones(lora_layer.out_features, device=lora_b.weight.device)
        keep_outputs[protection.outputs.to(keep_outputs.device)] = 0
        _mask_weight(lora_a, keep_inputs.expand(lora_a.out_features, -1).contiguous())  # [r, in]
        _mask_weight(lora_b, keep_outputs[:, None].expand(-1, lora_b.in_features).contiguous())  # [out, r]


@torch.no_grad()
def bake(model: nn.Module, plan: dict[str, ModuleProtection], adapter: str = "default") -> None:
    """Zero A[:, protected inputs] and B[protected outputs, :] in the weights: the function is
    unchanged (the forward masks already ignore them); saved adapters and merges become exact."""
    for name, lora_layer in _lora_layers(model, plan):
        protection = plan[name]
        lora_layer.lora_A[adapter].weight[:, protection.inputs.to(lora_layer.lora_A[adapter].weight.device)] = 0
        lora_layer.lora_B[adapter].weight[protection.outputs.to(lora_layer.lora_B[adapter].weight.device), :] = 0


def bake_adapter_file(path: Path, plan: dict[str, ModuleProtection]) -> None:
    """`bake` on a saved PEFT adapter (adapter_model.safetensors), whatever sharding trained it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for module, protection in plan.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"][:, protection.inputs] = 0
        tensors[f"{key}.lora_B.weight"][protection.outputs, :] = 0
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def _lora_layers(model: nn.Module, plan: dict[str, ModuleProtection]):
    """(name in the base model, PEFT LoRA layer) for every planned module; every plan entry must be found."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found[_base_name(name)] = module
    missing = sorted(set(plan) - set(found))
    if missing:
        raise ProtectionError(f"{len(missing)} protected module(s) have no LoRA layer, e.g. {missing[0]!r}; "
                              "protect only modules the LoRA targets")
    return [(name, found[name]) for name in sorted(plan)]


def _base_name(peft_name: str) -> str:
    """'base_model.model.model.layers.3.mlp.up_proj' -> 'model.layers.3.mlp.up_proj'."""
    return peft_name.removeprefix("base_model.model.")


# ---- the audit file --------------------------------------------------------------------------------------------


def save_protection(path: Path, plan: dict[str, ModuleProtection], shapes: dict[str, tuple[int, int]],
                    config: ProtectionConfig) -> None:
    """protection.safetensors: '{module}.inputs' and '{module}.outputs' (int64 coordinates), and per
    module the protected dims and the Fisher mass they cover, in the metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for name, protection in plan.items():
        tensors[f"{name}.inputs"] = protection.inputs.contiguous()
        tensors[f"{name}.outputs"] = protection.outputs.contiguous()
    report = {name: protection.report(shapes[name]) for name, protection in plan.items()}
    metadata = {"format": "pt", "protection": json.dumps({"config": config.__dict__, "modules": report})}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def load_protection(path: Path) -> dict[str, ModuleProtection]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        report = json.loads(f.metadata()["protection"])["modules"]
        return {
            name: ModuleProtection(f.get_tensor(f"{name}.inputs"), f.get_tensor(f"{name}.outputs"),
                                   entry["input_mass_covered"], entry["output_mass_covered"])
            for name, entry in report.items()
        }


def plan_difference(recorded: dict[str, ModuleProtection], plan: dict[str, ModuleProtection]) -> str | None:
    """How two plans differ (the modules protected, or the coordinates of the first differing one), or None."""
    if recorded.keys() != plan.keys():
        return (f"the recorded plan protects {len(recorded)} module(s), this run's {len(plan)}, e.g. "
                f"{sorted(recorded.keys() ^ plan.keys())[0]!r} is in only one")
    for name in sorted(plan):
        same_inputs = torch.equal(recorded[name].inputs, plan[name].inputs)
        if not (same_inputs and torch.equal(recorded[name].outputs, plan[name].outputs)):
            return f"the protected {'output' if same_inputs else 'input'} coordinates of {name!r} differ"
    return None
