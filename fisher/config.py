"""Typed configuration of a Fisher run. YAML keys are the field names; unknown keys are an error.

    python -m fisher recipes/fisher.yaml --model DIR --data train.jsonl --out out/fisher
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

MODES = ("empirical", "true")
ESTIMATORS = ("exact", "per_token")  # per_token: Σ_t g_t² x_t², an approximation, always labelled so


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DatasetSpec:
    # A hub dataset name, or a local file / folder (JSONL, JSON, parquet, arrow, or a save_to_disk folder).
    path: str
    split: str = "train"
    name: str | None = None  # hub dataset config name
    # TRL field -> this dataset's column, e.g. {prompt: question, completion: answer}. Unset: the columns
    # already use TRL's names (messages | prompt + completion | text).
    columns: dict[str, str] | None = None
    weight: float = 1.0  # relative share of `num_examples` when several datasets are mixed


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

    @property
    def approximate(self) -> bool:
        return self.estimator != "exact"


def load_config(path: str | Path, **overrides: Any) -> FisherConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {str(path)!r} does not exist; pass a YAML such as recipes/fisher.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of FisherConfig fields")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict[str, Any], where: str = "config") -> FisherConfig:
    _reject_unknown(raw, FisherConfig, where)
    datasets = raw.get("datasets")
    if isinstance(datasets, str):  # --data PATH
        datasets = [{"path": datasets}]
    try:
        return FisherConfig(**{**raw, "datasets": dataset_specs(datasets, where)})
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def dataset_specs(datasets: Any, where: str) -> tuple[DatasetSpec, ...]:
    """A recipe's `datasets:` list (shared by fisher and heal recipes), each entry checked for unknown keys."""
    if not isinstance(datasets, list):
        raise ConfigError(f"{where}: datasets must be a list of {{path: ...}} entries")
    specs = []
    for i, entry in enumerate(datasets):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: datasets[{i}] must be a mapping with a 'path'")
        _reject_unknown(entry, DatasetSpec, f"{where}: datasets[{i}]")
        try:
            specs.append(DatasetSpec(**entry))
        except TypeError as error:  # no `path`
            raise ConfigError(f"{where}: datasets[{i}]: {error}") from None
    return tuple(specs)


def _reject_unknown(raw: dict[str, Any], cls, where: str) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def config_to_dict(config: FisherConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
