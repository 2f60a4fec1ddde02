"""Typed configuration of a Fisher run. YAML keys are the field names, any one overridable as --key value; unknown
keys are an error (docs/architecture.md, section "Configuration").

    python -m fisher recipes/fisher.yaml --model DIR --data train.jsonl --out out/fisher --batch_size 8
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_keys, check_required, config_values, field_names
from core.data import DatasetSpec, dataset_specs

MODES = ("empirical", "true")
ESTIMATORS = ("exact", "per_token")  # per_token: Σ_t g_t² x_t², an approximation, always labelled so


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class FisherConfig:
    model: str
    datasets: tuple[DatasetSpec, ...]
    out: str = "out/fisher"
    mode: str = "empirical"  # empirical: labels are the data's tokens; true: labels sampled from the model
    num_samples: int = 1  # labels sampled per example in `true` mode
    estimator: str = "exact"
    num_examples: int | None = None  # examples drawn from the mixture (None: every row of every dataset)
    max_length: int = 2048  # tokens; longer rows are truncated (keep_start, as TRL) and counted
    batch_size: int = 4  # examples per forward; the result does not depend on it
    seed: int = 0  # shuffling for the mixture, and label sampling in `true` mode
    dtype: str = "bfloat16"  # model weights; accumulators are always fp32
    gradient_checkpointing: bool = False
    # TRL's loss masks: assistant turns of conversations, completions of prompt/completion rows.
    assistant_only_loss: bool = True
    completion_only_loss: bool = True
    dataset_text_field: str = "text"
    max_nonfinite_share: float = 0.01  # fail when more than this share of examples has non-finite gradients
    examples_per_chunk: int = 1  # per-example gradients held at once for one module: memory vs speed
    # Loss positions whose [positions, vocab] fp32 logits exist at once: ≈ 6 · this · vocab · 4 bytes at the peak.
    logit_chunk_size: int = 256
    # Passes over the data, each hooking one contiguous group of decoder layers: hooked activations and fp32
    # sums on the device shrink to ~1/layer_groups, the forward/backward work grows layer_groups times.
    layer_groups: int = 1
    # Also accumulate each decoder Linear's K-FAC factors (input and output-gradient second moments, in the same
    # passes) and write their leading eigenvectors to fisher_factors.safetensors beside fisher.safetensors.
    factors: bool = False
    # Each stored basis keeps the fewest leading eigenvectors holding this share of the moment's trace, at most
    # `factor_max_rank` of them; the heal picks its protected subspace within what is stored.
    factor_energy_share: float = 0.9
    factor_max_rank: int = 512
    # A stack folder (its stack.json): factors only for the source layers of the slots within ±factor_seam_width
    # of a seam, the slots the heal trains (as HealConfig.seam_width). Unset: every decoder layer (64 GB of fp32
    # sums for E4B, 18 GB for the seed recipe's seam layers; docs/benchmarks.md).
    factor_stack: str | None = None
    factor_seam_width: int = 2

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} must be one of {MODES}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator {self.estimator!r} must be one of {ESTIMATORS}")
        if self.num_samples < 1 or (self.mode == "empirical" and self.num_samples != 1):
            raise ConfigError(f"num_samples {self.num_samples}: use 1 with mode empirical, >= 1 with mode true")
        for name in ("max_length", "batch_size", "examples_per_chunk", "logit_chunk_size", "layer_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.datasets:
            raise ConfigError("datasets is empty; give at least one {path: ...}")
        self._check_factor_options()

    def _check_factor_options(self) -> None:
        if not 0 < self.factor_energy_share <= 1:
            raise ConfigError(f"factor_energy_share {self.factor_energy_share} must be in (0, 1], e.g. 0.9")
        for name in ("factor_max_rank", "factor_seam_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.factor_stack is not None and not self.factors:
            raise ConfigError(f"factor_stack {self.factor_stack!r} is set but factors is false; set factors: true "
                              "or remove factor_stack")

    @property
    def approximate(self) -> bool:
        return self.estimator != "exact"


def load_config(path: str | Path | None, **overrides: Any) -> FisherConfig:
    """The FisherConfig of the YAML at `path`, `overrides` (the same keys, e.g. from the command line) on top."""
    values = config_values(path, field_names(FisherConfig), overrides, "recipes/fisher.yaml", ConfigError)
    return config_from_dict(values, str(path))


def config_from_dict(raw: dict[str, Any], where: str = "config") -> FisherConfig:
    check_keys(raw, field_names(FisherConfig), where, ConfigError)
    check_required(FisherConfig, raw, where, ConfigError)
    return FisherConfig(**{**raw, "datasets": dataset_specs(raw["datasets"], where)})


def config_to_dict(config: FisherConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
