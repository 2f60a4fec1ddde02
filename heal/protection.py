"""Fisher-subspace protection: the LoRA update of a targeted Linear never moves the source model's
high-Fisher directions. Two constructions (HealConfig.protection): `coordinates`, the highest-Fisher input and
output coordinates (`plan_protection`, masks); `kfac`, the leading K-FAC eigen-directions (`plan_kfac`, projections,
heal/kfac.py). A third, `ewc`, holds nothing fixed: `plan_ewc` weighs a penalty that heal/ewc.py adds to the loss.
`PLANNERS` picks a heal's planner; `slot_fisher` maps the source's Fisher or factors onto the stack's slots, `attach`
applies a plan inside the LoRA factors' forward, and `bake` applies it to the weights of the live model or a saved
adapter.

See docs/architecture.md, section "The heal (`heal/`)".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from torch import nn

from fisher.factors import ModuleFactors
from heal.config import HealConfig
from heal.kfac import SubspaceProtection
from stack.manifest import StackManifest
from stack.plan import Slot

logger = logging.getLogger(__name__)

PROTECTION_FILE = "protection.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # the LoRA weights in a folder PEFT saved


class ProtectionError(ValueError):
    pass


@dataclass(frozen=True)
class ModuleProtection:
    """One module's protected coordinates (`protection: coordinates`); heal.kfac.SubspaceProtection is the
    `kfac` counterpart, with the same interface."""

    kind: ClassVar[str] = "coordinates"
    inputs: torch.Tensor  # protected input coordinates (int64, sorted)
    outputs: torch.Tensor  # protected output coordinates (int64, sorted)
    input_mass_covered: float  # share of the module's Fisher mass on the protected input coordinates
    output_mass_covered: float

    @property
    def protected_dims(self) -> tuple[int, int]:
        """(protected input coordinates, protected output coordinates)."""
        return len(self.inputs), len(self.outputs)

    @property
    def covered(self) -> tuple[float, float]:
        return self.input_mass_covered, self.output_mass_covered

    def report(self, shape: tuple[int, int]) -> dict:
        return {"protected_inputs": len(self.inputs), "in_features": shape[1],
                "input_mass_covered": self.input_mass_covered,
                "protected_outputs": len(self.outputs), "out_features": shape[0],
                "output_mass_covered": self.output_mass_covered}

    def attach(self, lora_a: nn.Linear, lora_b: nn.Linear) -> None:
        """Mask inside the factors' forward: A's protected input columns and B's protected output rows never act,
        so ΔW e_k = 0 and e_oᵀ ΔW = 0."""
        keep_inputs = torch.ones(lora_a.in_features, device=lora_a.weight.device)
        keep_inputs[self.inputs.to(keep_inputs.device)] = 0
        keep_outputs = torch.ones(lora_b.out_features, device=lora_b.weight.device)
        keep_outputs[self.outputs.to(keep_outputs.device)] = 0
        _mask_weight(lora_a, keep_inputs.expand(lora_a.out_features, -1).contiguous())  # [r, in]
        _mask_weight(lora_b, keep_outputs[:, None].expand(-1, lora_b.in_features).contiguous())  # [out, r]

    def bake(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Zero A[:, protected inputs] and B[protected outputs, :] in place (live parameters or a saved adapter's
        tensors)."""
        lora_a[:, self.inputs.to(lora_a.device)] = 0
        lora_b[self.outputs.to(lora_b.device), :] = 0

    def audit_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.inputs": self.inputs.contiguous(), f"{module}.outputs": self.outputs.contiguous()}

    @classmethod
    def from_audit(cls, tensors, module: str, entry: dict) -> ModuleProtection:
        """`tensors`: an open safetensors file (get_tensor); `entry`: the module's report."""
        return cls(tensors.get_tensor(f"{module}.inputs"), tensors.get_tensor(f"{module}.outputs"),
                   entry["input_mass_covered"], entry["output_mass_covered"])

    def difference(self, other: ModuleProtection) -> str | None:
        """Which protected coordinates differ from `other`'s ('input' or 'output' coordinates), or None."""
        if not torch.equal(self.inputs, other.inputs):
            return "input coordinates"
        if not torch.equal(self.outputs, other.outputs):
            return "output coordinates"
        return None


@dataclass(frozen=True)
class PenalisedModule:
    """One module's entry in a `protection: ewc` plan: nothing is held fixed, the update pays ewc_lambda · Σ F̃ ΔW².
    heal/ewc.py's FisherPenalty puts it into the LoRA forward and the loss (no attach or bake here); this is the
    audit and resume side, with ModuleProtection's interface."""

    kind: ClassVar[str] = "ewc"
    fisher: torch.Tensor | None  # F̃ [out, in] = F / fisher_mean; None when read back (protection.safetensors omits it)
    fisher_total: float  # Σ F̃ over the module's entries (over all penalised modules they sum to their entry count)
    fisher_mean: float  # the normalisation constant: the source Fisher's mean entry over every penalised module
    ewc_lambda: float

    def report(self, shape: tuple[int, int]) -> dict:
        return {"in_features": shape[1], "out_features": shape[0], "fisher_total": self.fisher_total,
                "fisher_mean": self.fisher_mean, "ewc_lambda": self.ewc_lambda}

    def audit_tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_audit(cls, tensors, module: str, entry: dict) -> PenalisedModule:
        return cls(None, entry["fisher_total"], entry["fisher_mean"], entry["ewc_lambda"])

    def difference(self, other: PenalisedModule) -> str | None:
        """'penalty weights' when λ or the normalised Fisher (its mean, the module's total) differ, or None."""
        same = (self.ewc_lambda, self.fisher_mean, self.fisher_total) == (other.ewc_lambda, other.fisher_mean,
                                                                         other.fisher_total)
        return None if same else "penalty weights"


# by HealConfig.protection
PLAN_ENTRIES = {entry.kind: entry for entry in (ModuleProtection, SubspaceProtection, PenalisedModule)}
ModulePlan = ModuleProtection | SubspaceProtection | PenalisedModule


# ---- Fisher onto slots ------------------------------------------------------------------------------------


Value = TypeVar("Value")


def slot_fisher(fisher: dict[str, Value], manifest: StackManifest, first_copy_only: bool = False) -> dict[str, Value]:
    """Fisher entries keyed by source-layer names -> keyed by the stack's names: the Fisher's tensors (by weight
    name) or the K-FAC factors (by module name).

    Grafted K/V weights (a slot's k/v taken from another layer) get no entry: their source layer had
    none, and the donor's Fisher measures another layer's use of them.
    """
    prefix = manifest.layer_prefix
    by_layer: dict[int, dict[str, Value]] = {}
    for name, values in fisher.items():
        if not name.startswith(prefix):
            raise ProtectionError(f"Fisher entry {name!r} is not under the stack's layer prefix {prefix!r}; "
                                  f"was it computed on {manifest.source.model!r}?")
        layer, suffix = name[len(prefix):].split(".", 1)
        by_layer.setdefault(int(layer), {})[suffix] = values
    out = {}
    for slot in protected_slots(manifest, first_copy_only):
        for suffix, values in by_layer.get(slot.source_layer, {}).items():
            if not manifest.is_grafted_kv(slot, f"{suffix}."):  # '.': a module name is a K/V tensor's prefix
                out[f"{prefix}{slot.index}.{suffix}"] = values
    return out


def protected_slots(manifest: StackManifest, first_copy_only: bool) -> list[Slot]:
    """The slots that take their source layer's protection: every one, or with first_copy_only the first slot
    holding each source layer."""
    slots, seen = [], set()
    for slot in manifest.slots:
        if not (first_copy_only and slot.source_layer in seen):
            slots.append(slot)
        seen.add(slot.source_layer)
    return slots


def protected_modules(module_names: list[str], protect_modules: tuple[str, ...] | None) -> list[str]:
    """The targeted modules a heal protects: all, or those whose name ends with one of `protect_modules`
    ('q_proj', or 'self_attn.q_proj'). A suffix matching no targeted module is an error."""
    if protect_modules is None:
        return list(module_names)
    unmatched = [suffix for suffix in protect_modules if not any(_ends_with(n, suffix) for n in module_names)]
    if unmatched:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in module_names})
        raise ProtectionError(f"protect_modules {unmatched} match no targeted module; the targets are {kinds} "
                              "(name a targeted module, or add it to `modules:`)")
    return [name for name in module_names if any(_ends_with(name, suffix) for suffix in protect_modules)]


def _ends_with(module: str, suffix: str) -> bool:
    return module == suffix or module.endswith(f".{suffix}")


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


def plan_protection(fisher: dict[str, torch.Tensor], module_names: list[str], mass_share: float,
                    max_fraction: float) -> dict[str, ModuleProtection]:
    """Protected coordinates of each targeted module (by module name) that has a Fisher; `mass_share` and
    `max_fraction` as in protected_coordinates (a heal's come from its HealConfig)."""
    plan = {}
    for module in module_names:
        values = fisher.get(f"{module}.weight")
        if values is None:
            continue
        inputs, input_share = protected_coordinates(values.sum(0), mass_share, max_fraction)
        outputs, output_share = protected_coordinates(values.sum(1), mass_share, max_fraction)
        plan[module] = ModuleProtection(inputs, outputs, input_share, output_share)
    return plan


# ---- which penalty weights -----------------------------------------------------------------------------------


def plan_ewc(fisher: dict[str, torch.Tensor], module_names: list[str],
             ewc_lambda: float) -> dict[str, PenalisedModule]:
    """The penalty's entry of every module in `module_names` that has a slot Fisher (`fisher` keyed by weight name,
    as slot_fisher returns it), with F̃ = F / mean(F) over every entry of those modules, in fp32.

    The Fisher's absolute scale depends on the model and on the loss tokens per example (ℓ sums their
    log-likelihoods), so λ could not carry over between heals with F itself; F̃ has mean 1 over the penalised
    entries, so λ = 1 prices an average entry's squared change at 1, whatever the model or data."""
    values = {module: fisher[f"{module}.weight"] for module in module_names if f"{module}.weight" in fisher}
    if not values:
        raise ProtectionError(f"protection: ewc, but none of the {len(module_names)} targeted module(s) has a source "
                              "Fisher (grafted K/V, and later copies with first_copy_only, have none); target "
                              "modules that hold a source layer's weights")
    mean = sum(float(v.double().sum()) for v in values.values()) / sum(v.numel() for v in values.values())
    if not mean > 0:
        raise ProtectionError(f"protection: ewc: the Fisher of the {len(values)} targeted module(s) is zero "
                              "everywhere, so it cannot be normalised; recompute the Fisher on data with loss tokens")
    plan = {}
    for module, v in values.items():
        normalised = v.float() / mean
        plan[module] = PenalisedModule(normalised, float(normalised.double().sum()), mean, ewc_lambda)
    return plan


# ---- which eigen-directions ------------------------------------------------------------------------------------


def plan_kfac(factors: dict[str, ModuleFactors], manifest: StackManifest, shapes: dict[str, tuple[int, int]],
              heal: HealConfig) -> dict[str, SubspaceProtection]:
    """Protected bases of each module in `shapes` (the protected targets, by name, with their [out, in]) from the
    source's K-FAC factors mapped onto the slots (slot_fisher), picked by heal.kfac.leading_subspace with the heal's
    kfac_energy_share and kfac_max_fraction. A module that takes its source layer's protection (not grafted K/V,
    not a later copy under first_copy_only) must have factors of its own width."""
    mapped = slot_fisher(factors, manifest, heal.first_copy_only)
    slots = {slot.index for slot in protected_slots(manifest, heal.first_copy_only)}
    missing = [module for module in shapes if module not in mapped and _takes_protection(module, manifest, slots)]
    if missing:
        raise _missing_factors(repr(missing[0]), len(missing), heal)
    plan = {}
    for module, shape in shapes.items():
        if module in mapped:
            plan[module] = SubspaceProtection.select(mapped[module], heal.kfac_energy_share, heal.kfac_max_fraction)
            _check_basis_widths(module, plan[module], shape, heal)
    _warn_short_bases({module: mapped[module] for module in plan}, heal.kfac_energy_share)
    return plan


def check_factor_layers(factors: dict[str, ModuleFactors], manifest: StackManifest, trained_slots: set[int],
                        heal: HealConfig) -> None:
    """Before any model loads: every slot in `trained_slots` that takes its source layer's protection needs that
    layer's factors (plan_kfac then checks module by module)."""
    prefix = manifest.layer_prefix
    covered = {int(name[len(prefix):].split(".", 1)[0]) for name in factors if name.startswith(prefix)}
    missing = [slot for slot in protected_slots(manifest, heal.first_copy_only)
               if slot.index in trained_slots and slot.source_layer not in covered]
    if missing:
        raise _missing_factors(f"source layer {missing[0].source_layer} (held by the trained slot {missing[0].index})",
                               len(missing), heal)


def _takes_protection(module: str, manifest: StackManifest, slots: set[int]) -> bool:
    """Whether `module` (a slot's module) takes its source layer's protection: its slot is in `slots`
    (protected_slots) and it is not a grafted K/V module."""
    prefix = manifest.layer_prefix
    if not module.startswith(prefix):
        return False
    index, suffix = module[len(prefix):].split(".", 1)
    return int(index) in slots and not manifest.is_grafted_kv(manifest.slots[int(index)], f"{suffix}.")


def _missing_factors(what: str, count: int, heal: HealConfig) -> ProtectionError:
    more = f" (and {count - 1} more)" if count > 1 else ""
    return ProtectionError(f"the K-FAC factors {heal.factors_path} have none for {what}{more}, which this heal "
                           "trains and protects. Recompute them with `python -m fisher` (factors: true) and either "
                           f"factor_stack: this stack with factor_seam_width >= seam_width ({heal.seam_width}), or no "
                           "factor_stack (every layer); or leave those modules out of protect_modules")


def _check_basis_widths(module: str, protection: SubspaceProtection, shape: tuple[int, int],
                        heal: HealConfig) -> None:
    widths = [protection.output_basis.shape[0], protection.input_basis.shape[0]]
    if widths != list(shape):
        raise ProtectionError(f"the K-FAC factors {heal.factors_path} of {module!r} span [out, in] = {widths}, but "
                              f"the stack's module is {list(shape)}; compute the factors on the stack's source model")


def _warn_short_bases(factors: dict[str, ModuleFactors], energy_share: float) -> None:
    """One warning naming the modules whose stored basis holds less than `energy_share` of the trace (they are
    protected with every stored vector, up to the cap)."""
    short = [f"{module} {side} ({basis.energy:.3f})" for module, module_factors in factors.items()
             for side, basis in (("input", module_factors.input), ("output", module_factors.output))
             if basis.energy < energy_share]
    if short:
        logger.warning("kfac_energy_share %s is more than the stored K-FAC basis holds for %d module side(s), "
                       "protected with every stored vector instead: %s. Recompute the factors with a larger "
                       "factor_energy_share or factor_max_rank", energy_share, len(short), ", ".join(short))


# ---- a protection's plan, by HealConfig.protection --------------------------------------------------------------


def _plan_coordinates(fisher: dict[str, torch.Tensor], manifest: StackManifest, shapes: dict[str, tuple[int, int]],
                      heal: HealConfig) -> dict[str, ModuleProtection]:
    return plan_protection(slot_fisher(fisher, manifest, heal.first_copy_only), list(shapes), heal.mass_share,
                           heal.max_fraction)


def _plan_ewc(fisher: dict[str, torch.Tensor], manifest: StackManifest, shapes: dict[str, tuple[int, int]],
              heal: HealConfig) -> dict[str, PenalisedModule]:
    return plan_ewc(slot_fisher(fisher, manifest, heal.first_copy_only), list(shapes), heal.ewc_lambda)


# Each planner takes the source statistics that HealConfig.statistics_path reads (the diagonal Fisher by weight name,
# or the K-FAC factors by module name), the stack manifest that maps them onto the slots, the protected modules'
# [out, in] by name, and the HealConfig.
PLANNERS = {"coordinates": _plan_coordinates, "kfac": plan_kfac, "ewc": _plan_ewc}


def protection_plan(statistics: dict, manifest: StackManifest, shapes: dict[str, tuple[int, int]],
                    heal: HealConfig) -> dict[str, ModulePlan]:
    """The plan of the modules in `shapes` under heal.protection (PLANNERS), from the source statistics it reads."""
    return PLANNERS[heal.protection](statistics, manifest, shapes, heal)


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


def attach(model: nn.Module, plan: dict[str, ModulePlan], adapter: str = "default") -> None:
    """Apply the plan inside every planned LoRA layer's factors' forward (ModuleProtection masks coordinates,
    SubspaceProtection projects out bases), so ΔW never acts on or writes into the protected directions."""
    for name, lora_layer in lora_layers(model, plan):
        plan[name].attach(lora_layer.lora_A[adapter], lora_layer.lora_B[adapter])


@torch.no_grad()
def bake(model: nn.Module, plan: dict[str, ModulePlan], adapter: str = "default") -> None:
    """Apply the plan to the LoRA weights themselves: the function is unchanged (the forward already ignores
    what the bake removes); saved adapters and merges then hold the guarantee without the forward."""
    for name, lora_layer in lora_layers(model, plan):
        plan[name].bake(lora_layer.lora_A[adapter].weight, lora_layer.lora_B[adapter].weight)


def bake_adapter_file(path: Path, plan: dict[str, ModulePlan]) -> None:
    """`bake` on a saved PEFT adapter (adapter_model.safetensors), whatever sharding trained it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for module, protection in plan.items():
        key = f"base_model.model.{module}"
        protection.bake(tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"])
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def lora_layers(model: nn.Module, plan: dict[str, ModulePlan]):
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


def save_protection(path: Path, plan: dict[str, ModulePlan], shapes: dict[str, tuple[int, int]],
                    heal: HealConfig) -> None:
    """protection.safetensors: per module, '{module}.inputs' and '{module}.outputs' (int64 coordinates) or
    '{module}.input_basis' and '{module}.output_basis' (fp32 [dim, k] bases), and in the metadata the kind, the
    heal's protection settings and per module the protected dims and the Fisher mass or energy they cover."""
    from safetensors.torch import save_file

    tensors = {}
    for name, protection in plan.items():
        tensors.update(protection.audit_tensors(name))
    report = {name: protection.report(shapes[name]) for name, protection in plan.items()}
    record = {"kind": heal.protection, "config": _settings(heal), "modules": report}
    metadata = {"format": "pt", "protection": json.dumps(record)}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def _settings(heal: HealConfig) -> dict:
    """The HealConfig fields that chose the plan, for its kind."""
    shared = {"first_copy_only": heal.first_copy_only, "protect_modules": heal.protect_modules}
    if heal.protection == "kfac":
        return {"kfac_energy_share": heal.kfac_energy_share, "kfac_max_fraction": heal.kfac_max_fraction,
                "factors": str(heal.factors_path), **shared}
    if heal.protection == "ewc":
        return {"ewc_lambda": heal.ewc_lambda, **shared}
    return {"mass_share": heal.mass_share, "max_fraction": heal.max_fraction, **shared}


def load_protection(path: Path) -> dict[str, ModulePlan]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        record = json.loads(f.metadata()["protection"])
        entry_class = PLAN_ENTRIES[record.get("kind", "coordinates")]  # files written before `kind`: coordinates
        return {name: entry_class.from_audit(f, name, entry) for name, entry in record["modules"].items()}


def plan_difference(recorded: dict[str, ModulePlan], plan: dict[str, ModulePlan]) -> str | None:
    """How two plans differ (the modules protected, or the kind, coordinates or bases of the first differing one),
    or None."""
    if recorded.keys() != plan.keys():
        return (f"the recorded plan protects {len(recorded)} module(s), this run's {len(plan)}, e.g. "
                f"{sorted(recorded.keys() ^ plan.keys())[0]!r} is in only one")
    for name in sorted(plan):
        if recorded[name].kind != plan[name].kind:
            return (f"the recorded plan protects {name!r} with protection: {recorded[name].kind}, this run with "
                    f"protection: {plan[name].kind}")
        difference = recorded[name].difference(plan[name])
        if difference:
            return f"the protected {difference} of {name!r} differ"
    return None


# ---- every save of a protected heal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protection:
    """A protected heal's plan, the [out, in] shape of each planned module, and the HealConfig that chose it:
    what every folder its trainer saves gets (`finish_saved_folder`)."""

    plan: dict[str, ModulePlan]
    shapes: dict[str, tuple[int, int]]
    heal: HealConfig

    def finish_saved_folder(self, folder: Path) -> None:
        """A folder the Trainer has just saved (checkpoint-N/ or the final output_dir): bake its adapter file
        (protected entries zeroed, or bases projected out), and record the plan beside it (protection.safetensors),
        which a resume checks."""
        adapter = folder / ADAPTER_FILE
        if not adapter.is_file():
            raise ProtectionError(f"{adapter} was not written, so its protected entries cannot be baked; under "
                                  "ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed "
                                  "config (recipes/accelerate/ds_zero3.json does)")
        bake_adapter_file(adapter, self.plan)
        save_protection(folder / PROTECTION_FILE, self.plan, self.shapes, self.heal)
