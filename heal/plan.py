"""Does the heal fit? The LoRA targets, trainable parameters, protection and peak GPU memory per rank
of a heal recipe, before launching it. No weights are loaded: the model is built on the meta device
from config.json, and the protection plan reads only the targeted modules' Fisher tensors.

    python -m heal.plan recipes/heal.yaml [--world-size 1 2 8] [--gpu-memory-gb 80] [--stack DIR] [--key value]

The memory model, formula by formula: docs/architecture.md, section "Before launching: `heal/plan.py`".
"""

from __future__ import annotations

import logging
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.cli import ConfigParser, setup_logging
from fisher.factors import FactorsFileError, load_factors
from fisher.file import FisherFileError, check_fisher_values, read_fisher_metadata
from heal.config import DISTILLATIONS, HealConfig, HealConfigError, load_config, recipe_parser
from heal.distill import TeacherError, resolve_teacher
from heal.kfac import SubspaceProtection
from heal.protection import (
    PLAN_ENTRIES,
    ModulePlan,
    ModuleProtection,
    PenalisedModule,
    ProtectionError,
    check_fisher_provenance,
    protected_modules,
    protection_plan,
    slot_fisher,
)
from heal.targets import TargetError, explicit_targets, select_targets
from stack.manifest import MANIFEST_NAME, StackManifest, load_manifest

logger = logging.getLogger(__name__)

GB = 10**9
FUSED_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE: tokens per LM-head tile
FUSED_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns per tile
CPU_TILE_TEMPORARIES = 4  # fp32 copies of a tile the torch (non-Triton) fold makes: z, exp, masks, grad
CUDA_OVERHEAD_BYTES = 2 * GB
DEFAULT_WORLD_SIZES = (1, 2, 8)
# bench/heal_memory_bench.py measured real CPU peaks of 1.33-1.67x the estimate (the backward's transient
# buffers and allocator slack are not modelled), so a verdict of "fits" keeps this margin.
DEFAULT_MARGIN = 1.7
STAGES = ("no ZeRO", "ZeRO-2", "ZeRO-3")
USER_ERRORS = (HealConfigError, TargetError, ProtectionError, TeacherError, FileNotFoundError, FisherFileError,
               FactorsFileError)


# ---- the model, from config.json only ----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer that its activations scale with (elements per token)."""

    q: int
    kv: int  # 0 on KV-shared layers: they read another layer's K/V
    ffn: int
    ple: int  # Gemma's per-layer-input width; 0 for models without PLE

    def activation_elements(self, hidden: int, lora: bool = False) -> int:
        """Elements per token this layer saves for the backward (module docstring); `lora`: it holds LoRA targets."""
        saved = 5 * hidden + 3 * self.ffn + 7 * self.q + 2 * self.kv + self.ple
        return saved + (2 * hidden + self.ffn + self.q if lora else 0)


@dataclass(frozen=True)
class ModelShape:
    parameters: int  # every parameter (tied ones once), towers and PLE table included
    largest_module_parameters: int  # what ZeRO-3 gathers at once, at least
    hidden: int
    vocab: int
    layers: tuple[LayerShape, ...]
    attention_types: int  # distinct attention masks built per forward (sliding and full: 2)


def meta_model(model_dir: Path) -> nn.Module:
    """The model heal/train.py would load from `model_dir`, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shape(model: nn.Module) -> ModelShape:
    text = model.config.get_text_config()
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        largest_module_parameters=largest,
        hidden=text.hidden_size,
        vocab=text.vocab_size,
        layers=tuple(_layer_shape(layer) for layer in model.get_decoder().layers),
        attention_types=len(set(getattr(text, "layer_types", None) or ["full_attention"])),
    )


def _layer_shape(layer: nn.Module) -> LayerShape:
    def width(name: str) -> int:
        module = next((m for n, m in layer.named_modules() if n.split(".")[-1] == name), None)
        return module.out_features if isinstance(module, nn.Linear) else 0

    return LayerShape(q=width("q_proj"), kv=width("k_proj"), ffn=width("gate_proj") or width("fc1"),
                      ple=width("per_layer_input_gate"))


# ---- targets and trainable parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    group: str  # seam, graft or other (heal/targets.py)
    in_features: int
    out_features: int
    rank: int

    @property
    def parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features)  # PEFT LoRA: A [r, in] and B [out, r]


def plan_targets(heal: HealConfig, model: nn.Module, manifest: StackManifest | None) -> list[Target]:
    """The LoRA targets, exactly as heal/train.py selects them, with each group's rank."""
    if heal.targets:
        groups = explicit_targets(model, list(heal.targets))
    else:
        groups = select_targets(model, manifest, heal.modules, heal.seam_width, heal.all_layers)
    rank = {"seam": heal.seam_r, "graft": heal.graft_r, "other": heal.other_r}
    targets = []
    for name, group in groups.items():
        linear = model.get_submodule(name)
        targets.append(Target(name, group, linear.in_features, linear.out_features, rank[group]))
    return targets


def target_layers(targets: list[Target]) -> frozenset[int]:
    """The decoder-layer indices holding LoRA targets."""
    return frozenset(int(m.group(1)) for t in targets if (m := re.search(r"layers\.(\d+)\.", t.name)))


# ---- protection, from the targeted modules' Fisher tensors only ---------------------------------------------


@dataclass(frozen=True)
class ProtectionSummary:
    plan: dict[str, ModulePlan]
    mass: dict[str, float] | None  # coordinates: each planned module's total Fisher mass, to weigh the coverage
    left_out: tuple[str, ...] = ()  # targets protect_modules leaves unprotected

    @property
    def basis_bytes(self) -> int:
        """kfac: the protected bases, fp32 buffers every rank holds whole (ZeRO partitions parameters, not
        buffers). Coordinates' masks, the size of the LoRA factors, are left out as before."""
        return sum(4 * (p.input_basis.numel() + p.output_basis.numel()) for p in self.plan.values()
                   if isinstance(p, SubspaceProtection))

    @property
    def penalty_entries(self) -> int:
        """ewc: the entries of F̃, buffers every rank holds whole, in the base weights' dtype."""
        return sum(p.fisher.numel() for p in self.plan.values() if isinstance(p, PenalisedModule))


def plan_module_protection(heal: HealConfig, manifest: StackManifest, targets: list[Target]) -> ProtectionSummary:
    """heal/train.py's protection plan of the targets it protects (protect_modules), from the source statistics the
    protection reads: only the Fisher tensors those targets map to, or the K-FAC factors. The files are checked as
    the heal checks them (fisher/file.py, fisher/factors.py, check_fisher_provenance), so a plan is never printed for
    a file the heal would refuse."""
    names = protected_modules([t.name for t in targets], heal.protect_modules)
    left_out = tuple(target.name for target in targets if target.name not in names)
    shapes = {t.name: (t.out_features, t.in_features) for t in targets if t.name in names}
    read = _read_factors if heal.reads_factors else _read_fisher
    statistics = read(heal, manifest, shapes)
    plan = protection_plan(statistics, manifest, shapes, heal)
    mass = None
    if PLAN_ENTRIES[heal.protection] is ModuleProtection:  # coordinates: each module's mass weighs its coverage
        mapped = slot_fisher(statistics, manifest, heal.first_copy_only)
        mass = {name: float(mapped[f"{name}.weight"].double().sum()) for name in plan}
    return ProtectionSummary(plan, mass, left_out)


def _read_factors(heal: HealConfig, manifest: StackManifest, shapes: dict[str, tuple[int, int]]) -> dict:
    factors, metadata = load_factors(heal.factors_path)
    check_fisher_provenance(heal.factors_path, metadata, Path(heal.stack) / MANIFEST_NAME, manifest,
                            heal.fisher_allow_other_source)
    return factors


def _read_fisher(heal: HealConfig, manifest: StackManifest, shapes: dict[str, tuple[int, int]]) -> dict:
    """The source Fisher tensors the modules in `shapes` map to, each checked for its shape and values."""
    from safetensors import safe_open

    metadata = read_fisher_metadata(heal.fisher)
    check_fisher_provenance(heal.fisher, metadata, Path(heal.stack) / MANIFEST_NAME, manifest,
                            heal.fisher_allow_other_source)
    fisher = {}
    with safe_open(heal.fisher, "pt") as f:
        available = set(f.keys())
        for source_name, expected in sorted(_source_fisher_names(manifest, shapes).items()):
            if source_name not in available:
                continue
            shape = tuple(f.get_slice(source_name).get_shape())
            if shape != expected:
                raise ProtectionError(f"Fisher tensor {source_name!r} in {heal.fisher} has shape {list(shape)} "
                                      f"but the stack's slots hold {list(expected)}; it comes from another model")
            fisher[source_name] = f.get_tensor(source_name)
            check_fisher_values(source_name, fisher[source_name], heal.fisher)
    return fisher


def _source_fisher_names(manifest: StackManifest, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Source-checkpoint weight name -> [out, in] for every module in `shapes` whose slot maps to a source layer
    (grafted K/V excluded: their source layer had none)."""
    prefix = manifest.layer_prefix
    needed = {}
    for name, shape in shapes.items():
        if not name.startswith(prefix):
            continue
        index, suffix = name[len(prefix):].split(".", 1)
        slot = manifest.slots[int(index)]
        if not manifest.is_grafted_kv(slot, f"{suffix}.weight"):
            needed[f"{prefix}{slot.source_layer}.{suffix}.weight"] = shape
    return needed


# ---- memory ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    batch: int  # per_device_train_batch_size
    length: int  # max_length
    checkpointing: bool
    bf16: bool
    device: str = "cuda"  # "cuda": Triton LM head, CUDA overhead; "cpu": torch LM head fold, none

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def weight_bytes(self) -> int:
        return 2 if self.bf16 else 4


@dataclass(frozen=True)
class Distill:
    teacher: ModelShape
    chunk: int  # distill_chunk_size


def memory(shape: ModelShape, lora_parameters: int, lora_layers: frozenset[int], work: Workload, stage: str,
           world: int, distill: Distill | None = None) -> dict[str, int]:
    """Peak bytes per rank by component, for one of STAGES at `world` ranks (module docstring: the formulas)."""
    out = {
        "weights": _weights(shape, work, stage, world),
        "LoRA + grads + AdamW": _lora_state(lora_parameters, work, stage, world),
        "activations": activation_bytes(shape, lora_layers, work),
        "logits (fused CE)": _fused_head(shape, work),
    }
    if distill is not None:
        out["teacher weights"] = _weights(distill.teacher, work, stage, world)
        out["teacher forward + KL"] = _teacher_working_set(distill, work)
    out["CUDA/NCCL overhead"] = CUDA_OVERHEAD_BYTES if work.device == "cuda" else 0
    return out


def _weights(shape: ModelShape, work: Workload, stage: str, world: int) -> int:
    if stage == "ZeRO-3":
        return (shape.parameters // world + shape.largest_module_parameters) * work.weight_bytes
    return shape.parameters * work.weight_bytes


def _lora_state(psi: int, work: Workload, stage: str, world: int) -> int:
    if stage == "no ZeRO":
        return 16 * psi  # fp32 params, grads, exp_avg, exp_avg_sq
    low = work.weight_bytes  # DeepSpeed holds params and grads in the training dtype
    if stage == "ZeRO-2":
        return low * psi + (low + 12) * psi // world
    return (2 * low + 12) * psi // world


def activation_bytes(shape: ModelShape, lora_layers: frozenset[int], work: Workload) -> int:
    """Bytes autograd saves for one step's backward on one rank: every layer from the lowest LoRA layer up
    (nothing below it needs a gradient), or under gradient checkpointing each layer's input plus one layer
    recomputed; the PLE inputs and the attention masks on top."""
    h, b = shape.hidden, work.weight_bytes
    per_layer = [layer.activation_elements(h, i in lora_layers) for i, layer in enumerate(shape.layers)]
    ple = sum(layer.ple for layer in shape.layers)
    if work.checkpointing:
        elements = len(per_layer) * h + max(per_layer) + ple + 3 * h
    else:
        elements = sum(per_layer[min(lora_layers, default=0):]) + ple + 3 * h
    masks = shape.attention_types * work.length
    return work.tokens * (elements + masks) * b


def _fused_head(shape: ModelShape, work: Workload) -> int:
    rows = min(work.tokens, FUSED_TOKEN_TILE)
    if work.device == "cuda":
        tile = rows * FUSED_VOCAB_TILE * work.weight_bytes  # torch.empty: allocated whole
    else:
        tile = rows * min(shape.vocab, FUSED_VOCAB_TILE) * 4 * (1 + CPU_TILE_TEMPORARIES)  # only touched pages count
    return tile + work.tokens * shape.hidden * (4 + work.weight_bytes)


def _teacher_working_set(distill: Distill, work: Workload) -> int:
    teacher, b = distill.teacher, work.weight_bytes
    forward = max(layer.activation_elements(teacher.hidden) for layer in teacher.layers)
    ple = sum(layer.ple for layer in teacher.layers)
    kl_buffers = 4 * distill.chunk * teacher.vocab * 4
    return work.tokens * (forward + ple + teacher.hidden + 3 * teacher.hidden) * b + kl_buffers


# ---- putting it together -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealPlan:
    targets: list[Target]
    shape: ModelShape
    work: Workload
    distill: Distill | None
    protection: ProtectionSummary | None
    protection_note: str  # why there is no protection plan, when there is none

    @property
    def lora_parameters(self) -> int:
        return sum(t.parameters for t in self.targets)

    def memory(self, stage: str, world: int) -> dict[str, int]:
        out = memory(self.shape, self.lora_parameters, target_layers(self.targets), self.work, stage, world,
                     self.distill)
        if self.protection is not None and self.protection.basis_bytes:
            out["protection bases (kfac)"] = self.protection.basis_bytes  # the same at every stage and world size
        if self.protection is not None and self.protection.penalty_entries:
            out["Fisher penalty F̃ (ewc)"] = self.protection.penalty_entries * self.work.weight_bytes
        return out


def build_heal_plan(heal: HealConfig, sft, device: str = "cuda") -> HealPlan:
    stack_dir = Path(heal.stack)
    manifest = _manifest(stack_dir, required=heal.targets is None)
    model = meta_model(stack_dir)
    targets = plan_targets(heal, model, manifest)
    checkpointing = bool(getattr(sft, "activation_checkpointing", None) or sft.gradient_checkpointing)
    work = Workload(sft.per_device_train_batch_size, sft.max_length, checkpointing, bool(sft.bf16), device)
    distill = None
    if heal.objective in DISTILLATIONS:  # on-policy too: the teacher is resident either way
        distill = Distill(model_shape(meta_model(_teacher_dir(heal, manifest))), heal.distill_chunk_size)
    protection, note = None, "protect: false"
    if heal.protect and manifest is None:
        note = "no stack.json: protection maps the source Fisher onto slots through it"
    elif heal.protect and not heal.statistics_path.is_file():
        what, how = ("K-FAC factors", "`make fisher` with factors: true") if heal.reads_factors else (
            "Fisher", "`make fisher`")
        note = f"the {what} file {heal.statistics_path} is absent; run {how} to plan the protection"
    elif heal.protect:
        protection, note = plan_module_protection(heal, manifest, targets), ""
    return HealPlan(targets, model_shape(model), work, distill, protection, note)


def _manifest(stack_dir: Path, required: bool) -> StackManifest | None:
    if not (stack_dir / "config.json").is_file():
        raise FileNotFoundError(f"{stack_dir / 'config.json'} not found: point `stack:` (or --stack) at a folder "
                                "written by `python -m stack`")
    if (stack_dir / MANIFEST_NAME).is_file() or required:
        try:
            return load_manifest(stack_dir)
        except ValueError as error:
            raise HealConfigError(str(error)) from None
    return None


def _teacher_dir(heal: HealConfig, manifest: StackManifest | None) -> str:
    """The teacher's folder: a local one, or a hub id resolved from the local HF cache (config.json only)."""
    teacher = resolve_teacher(heal.teacher, manifest)
    if Path(teacher).is_dir():
        return teacher
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(teacher, allow_patterns=["config.json"])
    except Exception as error:  # offline, gated, no such repo
        raise TeacherError(f"the teacher {teacher!r}'s config.json cannot be fetched ({str(error).splitlines()[0]}); "
                           "set `teacher:` to a local model folder") from None


# ---- printing ---------------------------------------------------------------------------------------------------


def format_plan(plan: HealPlan, world_sizes: tuple[int, ...], gpu_memory_gb: float,
                margin: float = DEFAULT_MARGIN) -> str:
    sections = [_format_targets(plan), _format_protection(plan),
                _format_memory(plan, world_sizes, gpu_memory_gb, margin)]
    return "\n\n".join(sections)


def _format_targets(plan: HealPlan) -> str:
    lines = ["LoRA targets by group:"]
    for group in ("seam", "graft", "other"):
        members = [t for t in plan.targets if t.group == group]
        if members:
            kinds = sorted({t.name.rsplit(".", 1)[-1] for t in members})
            lines.append(f"  {group:<5} {len(members):>4} modules, r={members[0].rank}, "
                         f"{sum(t.parameters for t in members):>12,} params  ({', '.join(kinds)})")
            lines.append(f"        layers {_layer_ranges(members)}")
    lines.append(f"  total {len(plan.targets):>4} modules, {plan.lora_parameters:,} trainable parameters "
                 f"(Σ r·(in+out)), base model {plan.shape.parameters:,} parameters (frozen)")
    return "\n".join(lines)


def _layer_ranges(targets: list[Target]) -> str:
    indices = sorted({int(m.group(1)) for t in targets if (m := re.search(r"layers\.(\d+)\.", t.name))})
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "-"


def _format_protection(plan: HealPlan) -> str:
    if plan.protection is None:
        return f"Protection: none ({plan.protection_note})."
    protected = plan.protection.plan
    if isinstance(next(iter(protected.values()), None), PenalisedModule):
        return _format_penalty(plan)
    if plan.protection.mass is None:
        header = ("K-FAC eigen-subspace protection ({} of {} targets have source factors): protected input "
                  "eigenvectors / in_features (energy covered), output eigenvectors / out_features (energy covered)")
    else:
        header = ("Protection ({} of {} targets have a source Fisher): protected inputs / in_features (Fisher mass "
                  "covered), protected outputs / out_features (mass covered)")
    def dims(target, p) -> str:
        (inputs, outputs), (input_share, output_share) = p.protected_dims, p.covered
        return (f"in {inputs}/{target.in_features} ({input_share:.3f}), "
                f"out {outputs}/{target.out_features} ({output_share:.3f})")

    lines = [header.format(len(protected), len(plan.targets)), *_per_target(plan, protected, dims, "unprotected")]
    lines.append("  coverage by group (min / median / max):")
    groups = {t.name: t.group for t in plan.targets}
    for group in ("seam", "graft", "other"):
        members = [p for name, p in protected.items() if groups[name] == group]
        if members:
            lines.append(f"    {group:<5} inputs {_spread([p.covered[0] for p in members])}, "
                         f"outputs {_spread([p.covered[1] for p in members])}")
    mass = plan.protection.mass
    if mass is not None:
        total = sum(mass.values()) or 1.0
        inputs = sum(p.input_mass_covered * mass[name] for name, p in protected.items()) / total
        outputs = sum(p.output_mass_covered * mass[name] for name, p in protected.items()) / total
        lines.append(f"    total (mass-weighted): inputs {inputs:.3f}, outputs {outputs:.3f}")
    return "\n".join(lines)


def _format_penalty(plan: HealPlan) -> str:
    """`protection: ewc`: λ, the normalisation, and each target's share of Σ F̃ (its share of the penalty's weight)."""
    penalised = plan.protection.plan
    entry = next(iter(penalised.values()))
    total = sum(p.fisher_total for p in penalised.values())
    lines = [f"Fisher penalty (protection: ewc, ewc_lambda {entry.ewc_lambda}) on {len(penalised)} of "
             f"{len(plan.targets)} targets, F̃ = F / {entry.fisher_mean:.6g}: each target's share of Σ F̃",
             *_per_target(plan, penalised, lambda _, p: f"{p.fisher_total / total:.3f}", "not penalised")]
    return "\n".join(lines)


def _per_target(plan: HealPlan, entries: dict, describe, missing: str) -> list[str]:
    """One line per LoRA target: `describe(target, entry)` where the plan has an entry, else why it has none."""
    lines = []
    for target in plan.targets:
        entry = entries.get(target.name)
        if entry is None:
            why = "not in protect_modules" if target.name in plan.protection.left_out else "no source Fisher"
            lines.append(f"  {target.group:<5} {target.name}: {missing} ({why})")
        else:
            lines.append(f"  {target.group:<5} {target.name}: {describe(target, entry)}")
    return lines


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def _format_memory(plan: HealPlan, world_sizes: tuple[int, ...], gpu_memory_gb: float, margin: float) -> str:
    work = plan.work
    header = (f"Peak GPU memory per rank, GB (10^9 bytes): batch {work.batch} x length {work.length}, "
              f"{'bf16' if work.bf16 else 'fp32'}, activation checkpointing {'on' if work.checkpointing else 'off'}"
              + (f", distill (KL chunk {plan.distill.chunk})" if plan.distill else "")
              + ". Formulas: docs/architecture.md, section 'Before launching'.")
    columns = [(stage, world) for world in world_sizes for stage in STAGES if not (stage == "no ZeRO" and world > 1)]
    tables = {column: plan.memory(*column) for column in columns}
    names = list(tables[columns[0]])
    width = max(len(n) for n in names + ["total"])
    lines = [header, f"  {'':<{width}} " + " ".join(f"{_column_name(*c):>13}" for c in columns)]
    for name in names:
        lines.append(f"  {name:<{width}} " + " ".join(f"{tables[c][name] / GB:>13.2f}" for c in columns))
    totals = {c: sum(tables[c].values()) for c in columns}
    lines.append(f"  {'total':<{width}} " + " ".join(f"{totals[c] / GB:>13.2f}" for c in columns))
    for column in columns:
        lines.append(f"  {_column_name(*column)}: {totals[column] / GB:.1f} GB per GPU: "
                     + _verdict(totals[column], gpu_memory_gb * GB, margin))
    return "\n".join(lines)


def _verdict(total: float, gpu_bytes: float, margin: float) -> str:
    """Fits only with the margin the CPU check measured between the estimate and a real peak."""
    gpu = f"{gpu_bytes / GB:g} GB"
    if total * margin <= gpu_bytes:
        return f"fits on {gpu} (with the x{margin:g} margin)"
    if total <= gpu_bytes:
        return f"may fit on {gpu}: within the estimate, not within the x{margin:g} margin"
    return f"does not fit on {gpu}"


def _column_name(stage: str, world: int) -> str:
    return f"{stage} x{world}" if stage != "no ZeRO" else "1 GPU, no ZeRO"


# ---- CLI ----------------------------------------------------------------------------------------------------------


def load_recipe(recipe: str | Path, **overrides):
    """(HealConfig, SFTConfig) of the recipe, `overrides` on top, validated as heal/train.py does, on a machine
    without a GPU: use_cpu keeps SFTConfig from refusing bf16 where no GPU is visible (planning runs before
    launching)."""
    return load_config(recipe, **{"use_cpu": True, **overrides})


def make_parser() -> ConfigParser:
    """heal/train.py's command line (a recipe and --key value overrides), plus the planning options."""
    parser = recipe_parser("python -m heal.plan", __doc__)
    parser.add_argument("--world-size", type=int, nargs="+", default=list(DEFAULT_WORLD_SIZES),
                        help="GPUs to plan for (default: 1 2 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (default 80)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"a config fits when margin x estimate <= GPU memory (default {DEFAULT_MARGIN:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    overrides, args = parser.parse(argv)
    setup_logging()
    if any(world < 1 for world in args.world_size):
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.margin < 1:
        parser.error(f"--margin must be >= 1 (a factor on the estimate), got {args.margin:g}")
    try:
        heal, sft = load_recipe(args.config, **overrides)
        plan = build_heal_plan(heal, sft)
    except USER_ERRORS as error:
        logger.error("%s", error)
        return 2
    print(format_plan(plan, tuple(args.world_size), args.gpu_memory_gb, args.margin), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
