"""Typed configuration of a heal. One flat YAML: keys are the fields of HealConfig (below) or of
TRL's SFTConfig (the trainer). Unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fisher.config import ConfigError, DatasetSpec, dataset_specs
from heal.protection import ProtectionConfig, ProtectionError


class HealConfigError(ValueError):
    pass


# sft: the data's labels; distill: + KL(teacher ‖ student) on the data's tokens; onpolicy: the KL on the student's
# own generations (heal/distill.py)
OBJECTIVES = ("sft", "distill", "onpolicy")
DISTILLATIONS = ("distill", "onpolicy")  # the objectives with a teacher: `teacher` and distill_* apply to both
DISTILL_TOKENS = ("loss", "all")  # which positions the KL counts: the label loss's, or every non-pad one


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
    # Fisher-subspace protection (heal/protection.py).
    protect: bool = True
    mass_share: float = 0.75
    max_fraction: float = 0.25
    first_copy_only: bool = False
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
        if self.protect and self.fisher is None:
            raise HealConfigError("protect: true needs `fisher:` (a fisher.safetensors); "
                                  "set protect: false to heal without it")
        if self.load_in_4bit and self.merge:
            raise HealConfigError("merge: true with load_in_4bit: merge into the bf16 raw stack afterwards instead "
                                  "(heal without merge, then rerun with merge: true and load_in_4bit: false "
                                  "to resume and merge)")
        self._check_objective()
        if self.seam_width < 1:
            raise HealConfigError(f"seam_width must be >= 1, got {self.seam_width}")
        if self.num_examples is not None and self.num_examples < 1:
            raise HealConfigError(f"num_examples must be >= 1 (or unset: every row), got {self.num_examples}")
        try:  # the ranges ProtectionConfig enforces, checked here: before any model loads
            ProtectionConfig(self.mass_share, self.max_fraction, self.first_copy_only)
        except ProtectionError as error:
            raise HealConfigError(str(error)) from None

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


def load_config(path: str | Path, **overrides: Any):
    """(HealConfig, SFTConfig) from one YAML, with `overrides` (same keys) applied on top."""
    from trl import SFTConfig

    path = Path(path)
    if not path.is_file():
        raise HealConfigError(f"recipe {str(path)!r} does not exist; pass a YAML such as recipes/heal.yaml")
    raw = {**(yaml.safe_load(path.read_text()) or {}), **overrides}
    heal_keys = {f.name for f in fields(HealConfig)}
    sft_keys = {f.name for f in fields(SFTConfig)}
    unknown = sorted(set(raw) - heal_keys - sft_keys)
    if unknown:
        raise HealConfigError(f"{path}: unknown key(s) {unknown}; keys are HealConfig fields (heal/config.py) "
                              "or SFTConfig fields")
    heal_raw = {k: v for k, v in raw.items() if k in heal_keys}
    try:  # the same parsing as fisher recipes: an unknown key in an entry is named
        specs = dataset_specs(heal_raw.pop("datasets", None) or [], str(path))
    except ConfigError as error:
        raise HealConfigError(str(error)) from None
    if not specs:
        raise HealConfigError(f"{path}: `datasets` is empty; give at least one {{path: ...}}")
    for key in ("modules", "targets"):
        if heal_raw.get(key) is not None:
            heal_raw[key] = tuple(heal_raw[key])
    heal = HealConfig(datasets=specs, **heal_raw)
    sft_raw = {k: v for k, v in raw.items() if k in sft_keys}
    sft_raw.setdefault("report_to", "tensorboard")  # a heal logs to TensorBoard unless the recipe says otherwise
    sft = SFTConfig(**sft_raw)
    return heal, sft


def config_to_dict(heal: HealConfig, sft) -> dict[str, Any]:
    return {"heal": dataclasses.asdict(heal), "sft": sft.to_dict()}
