"""Typed configuration of a heal. One flat YAML: keys are the fields of HealConfig (below) or of
TRL's SFTConfig (the trainer), any one overridable as --key value; unknown keys are an error
(docs/architecture.md, section "Configuration").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import ConfigParser, check_required, config_values, field_names, with_field_types
from core.data import DataError, DatasetSpec, dataset_specs
from fisher.factors import FACTORS_FILE


class HealConfigError(ValueError):
    pass


# sft: the data's labels; distill: + KL(teacher ‖ student) on the data's tokens; onpolicy: the KL on the student's
# own generations (heal/distill.py)
OBJECTIVES = ("sft", "distill", "onpolicy")
DISTILLATIONS = ("distill", "onpolicy")  # the objectives with a teacher: `teacher` and distill_* apply to both
DISTILL_TOKENS = ("loss", "all")  # which positions the KL counts: the label loss's, or every non-pad one
# With protect: true, what is protected (heal/protection.py): coordinates, the highest-Fisher input and output
# coordinates (masks); kfac, the leading eigenvectors of the K-FAC factors (projections, heal/kfac.py); ewc, nothing
# held fixed: a soft Fisher penalty on the LoRA update joins the loss (heal/ewc.py).
# The source statistics each protection reads (HealConfig.statistics_path): the diagonal Fisher (fisher.safetensors,
# `make fisher`) or the K-FAC factors (fisher_factors.safetensors, `make fisher` with factors: true).
PROTECTION_STATISTICS = {"coordinates": "fisher", "kfac": "factors", "ewc": "fisher"}
PROTECTIONS = tuple(PROTECTION_STATISTICS)


@dataclass(frozen=True)
class HealConfig:
    stack: str  # the raw stack folder written by `python -m stack` (checkpoint + stack.json)
    datasets: tuple[DatasetSpec, ...]
    fisher: str | None = None  # fisher.safetensors of the stack's source model; None: no protection
    # A Fisher whose recorded source shards differ from stack.json's is an error; true: only a warning.
    fisher_allow_other_source: bool = False
    num_examples: int | None = None  # rows drawn from the dataset mixture (None: all)
    # What gets LoRA (heal/targets.py): slots within ±seam_width of each seam, the grafted k/v.
    seam_width: int = 2
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    all_layers: bool = False
    targets: tuple[str, ...] | None = None  # explicit module names instead (stack.json then optional)
    # LoRA rank and alpha per group.
    seam_r: int = 16
    seam_alpha: int = 32
    graft_r: int = 16
    graft_alpha: int = 32
    other_r: int = 8
    other_alpha: int = 16
    lora_dropout: float = 0.0
    # Fisher-subspace protection (heal/protection.py), one of PROTECTIONS.
    protect: bool = True
    protection: str = "coordinates"
    # coordinates: the highest-Fisher input and output coordinates are masked.
    mass_share: float = 0.75  # protect the fewest coordinates holding this share of a module's Fisher mass
    max_fraction: float = 0.25  # ... but never more than this fraction of its input (or output) dimensions
    # kfac: the leading eigenvectors of the K-FAC factors are projected out (heal/kfac.py).
    factors: str | None = None  # fisher_factors.safetensors; None: the one beside `fisher`
    kfac_energy_share: float = 0.5  # per module and side, the fewest stored eigenvectors holding this share of tr
    kfac_max_fraction: float = 0.25  # ... but never more than this fraction of the dimension
    # ewc: loss += ewc_lambda · Σ F̃ ⊙ ΔW² over the targeted modules, ΔW = (lora_alpha / r) · B A, F̃ the source
    # Fisher mapped onto the slots and divided by its mean entry over those modules (the Fisher's absolute scale
    # depends on the model and the loss tokens per example): ewc_lambda 1 prices an average entry's squared change
    # at 1, whatever the model. 0: the plain heal, bit for bit.
    ewc_lambda: float = 1.0
    # Every construction.
    first_copy_only: bool = False  # protect only the first slot holding a duplicated source layer
    protect_modules: tuple[str, ...] | None = None  # protect only targets ending in these names; None: every target
    # Objective. distill: loss = distill_alpha · KL(teacher ‖ student) + (1 − distill_alpha) · CE (heal/distill.py).
    objective: str = "sft"
    teacher: str | None = None  # a model folder with the student's tokenizer; None: the source model in stack.json
    distill_alpha: float = 1.0
    distill_temperature: float = 1.0
    distill_tokens: str = "loss"
    distill_chunk_size: int = 256  # positions per KL chunk (peak ≈ 4 · chunk · vocab · 4 bytes)
    # onpolicy (TRL GKD-style): per micro-batch, with probability onpolicy_lmbda, the student generates each row's
    # completion (up to onpolicy_max_new_tokens, at onpolicy_temperature; 0 = greedy) and the KL is taken on it.
    onpolicy_lmbda: float = 1.0
    onpolicy_max_new_tokens: int = 96
    onpolicy_temperature: float = 1.0
    merge: bool = False  # also write OUTPUT_DIR/merged: the healed full model in the raw stack's layout
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, one CUDA GPU)

    def __post_init__(self):
        self._check_protection()
        if self.load_in_4bit and self.merge:
            raise HealConfigError("merge: true with load_in_4bit: merge into the bf16 raw stack afterwards instead "
                                  "(heal without merge, then rerun with merge: true and load_in_4bit: false "
                                  "to resume and merge)")
        self._check_objective()
        if self.seam_width < 1:
            raise HealConfigError(f"seam_width must be >= 1, got {self.seam_width}")
        if self.num_examples is not None and self.num_examples < 1:
            raise HealConfigError(f"num_examples must be >= 1 (or unset: every row), got {self.num_examples}")

    @property
    def factors_path(self) -> Path | None:
        """protection: kfac's factors file: `factors`, else fisher_factors.safetensors beside `fisher`."""
        if self.factors is not None:
            return Path(self.factors)
        return Path(self.fisher).parent / FACTORS_FILE if self.fisher is not None else None

    @property
    def reads_factors(self) -> bool:
        """Whether the protection reads the K-FAC factors rather than the diagonal Fisher (PROTECTION_STATISTICS)."""
        return PROTECTION_STATISTICS[self.protection] == "factors"

    @property
    def statistics_path(self) -> Path | None:
        """The source statistics file the protection reads: the factors file (factors_path) or `fisher`."""
        if self.reads_factors:
            return self.factors_path
        return Path(self.fisher) if self.fisher is not None else None

    def _check_protection(self):
        if self.protection not in PROTECTIONS:
            raise HealConfigError(f"protection must be one of {PROTECTIONS}, got {self.protection!r}")
        if self.protect and self.statistics_path is None:
            raise HealConfigError(
                f"protect: true with protection: {self.protection} needs `factors:` (a fisher_factors.safetensors) "
                "or `fisher:` (the factors file beside it is read); set protect: false to heal without protection"
                if self.reads_factors else
                "protect: true needs `fisher:` (a fisher.safetensors); set protect: false to heal without it")
        if self.protect and not self.reads_factors and self.factors is not None:
            raise HealConfigError(f"`factors:` is set but protection is {self.protection!r}; set protection: kfac "
                                  "to protect with the K-FAC factors")
        for name in ("mass_share", "max_fraction", "kfac_energy_share", "kfac_max_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise HealConfigError(f"protection {name} must be in (0, 1), got {value}")
        if not 0 <= self.ewc_lambda < float("inf"):
            raise HealConfigError(f"ewc_lambda must be a finite number >= 0 (0: no penalty), got {self.ewc_lambda}")
        if self.protect_modules is not None and not (
                self.protect_modules and all(isinstance(name, str) and name for name in self.protect_modules)):
            raise HealConfigError(f"protect_modules must be a non-empty list of module names (e.g. [q_proj, o_proj]) "
                                  f"or unset (every target), got {self.protect_modules!r}")

    def _check_objective(self):
        if self.objective not in OBJECTIVES:
            raise HealConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective not in DISTILLATIONS:
            if self.teacher is not None:
                raise HealConfigError(f"`teacher:` is set but objective is {self.objective!r}; set objective: distill "
                                      "or onpolicy")
            return
        if not 0 <= self.distill_alpha <= 1:
            raise HealConfigError(f"distill_alpha must be in [0, 1] (the KL's share of the loss), "
                                  f"got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            raise HealConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.distill_tokens not in DISTILL_TOKENS:
            raise HealConfigError(f"distill_tokens must be one of {DISTILL_TOKENS}, got {self.distill_tokens!r}")
        if self.distill_chunk_size < 1:
            raise HealConfigError(f"distill_chunk_size must be >= 1, got {self.distill_chunk_size}")
        if self.objective == "onpolicy":
            self._check_onpolicy()

    def _check_onpolicy(self):
        if self.distill_alpha != 1:
            raise HealConfigError(f"objective: onpolicy needs distill_alpha: 1.0, got {self.distill_alpha}: its "
                                  "labels are the student's own generated tokens, so a CE term on them teaches "
                                  "nothing; use objective: distill to mix in the data's CE")
        if not 0 <= self.onpolicy_lmbda <= 1:
            raise HealConfigError(f"onpolicy_lmbda must be in [0, 1] (the share of batches the student generates), "
                                  f"got {self.onpolicy_lmbda}")
        if self.onpolicy_max_new_tokens < 1:
            raise HealConfigError(f"onpolicy_max_new_tokens must be >= 1, got {self.onpolicy_max_new_tokens}")
        if self.onpolicy_temperature < 0:
            raise HealConfigError(f"onpolicy_temperature must be >= 0 (0: greedy), got {self.onpolicy_temperature}")


def load_config(path: str | Path | None, **overrides: Any):
    """(HealConfig, SFTConfig) of the YAML at `path`, `overrides` (the same keys, e.g. from the command line) on
    top. One namespace, as TRL's: each key goes to the dataclass that has it."""
    from trl import SFTConfig

    heal_keys, sft_keys = field_names(HealConfig), field_names(SFTConfig)
    raw = config_values(path, heal_keys + sft_keys, overrides, "recipes/heal.yaml", HealConfigError)
    heal_raw = {k: v for k, v in raw.items() if k in heal_keys}
    check_required(HealConfig, heal_raw, str(path), HealConfigError)
    try:  # the same parsing as fisher recipes: an unknown key in an entry is named
        specs = dataset_specs(heal_raw.pop("datasets") or [], str(path))
    except DataError as error:
        raise HealConfigError(str(error)) from None
    if not specs:
        raise HealConfigError(f"{path}: `datasets` is empty; give at least one {{path: ...}}")
    heal = HealConfig(datasets=specs, **with_field_types(HealConfig, heal_raw))
    sft_raw = {k: v for k, v in raw.items() if k in sft_keys}
    sft_raw.setdefault("report_to", "tensorboard")  # a heal logs to TensorBoard unless the recipe says otherwise
    sft = SFTConfig(**sft_raw)
    return heal, sft


def config_to_dict(heal: HealConfig, sft) -> dict[str, Any]:
    return {"heal": dataclasses.asdict(heal), "sft": sft.to_dict()}


def recipe_parser(prog: str, description: str | None) -> ConfigParser:
    """The command line of every CLI that reads a heal recipe: the recipe, then --key value for any field of
    HealConfig or SFTConfig (resolve with load_config(args.config, **overrides))."""
    from trl import SFTConfig

    return ConfigParser(HealConfig, SFTConfig, prog=prog, description=description,
                        config_help="heal recipe YAML (HealConfig and SFTConfig fields)")
