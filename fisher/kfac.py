"""The Fisher stage's K-FAC side (`factors: true`): which decoder Linears get factors, and their eigenbases.

The sums themselves are accumulated by fisher.estimator.FactorSums in the Fisher's own passes; the file they end
in is fisher.factors (fisher_factors.safetensors, docs/architecture.md "The K-FAC factors file").
"""

from __future__ import annotations

import logging
import statistics

import torch
from torch import nn

from core.checkpoint import SourceCheckpoint
from core.files import sha256_file
from stack.manifest import load_manifest

from .config import ConfigError, FisherConfig
from .estimator import FactorSums, decoder_layer_of
from .factors import Eigenbasis, ModuleFactors, top_eigenbasis

logger = logging.getLogger(__name__)


def shard_sha256(source: SourceCheckpoint) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in source.shards}


def factor_layers(config: FisherConfig, num_layers: int, source_sha256: dict[str, str] | None) -> list[int]:
    """The source layers whose modules get factors: every one, or with `factor_stack` the source layers of that
    stack's slots within ±factor_seam_width of a seam. The stack must have been built from this very model, whose
    shards hash to `source_sha256` (needed with factor_stack)."""
    if config.factor_stack is None:
        return list(range(num_layers))
    manifest = load_manifest(config.factor_stack)
    if manifest.source.num_hidden_layers != num_layers or manifest.source.shard_sha256 != source_sha256:
        raise ConfigError(
            f"factor_stack {config.factor_stack!r} was stacked from {manifest.source.model!r} "
            f"({manifest.source.num_hidden_layers} layers, shards {manifest.source.shard_sha256}), not from the "
            f"Fisher's model {config.model!r} ({num_layers} layers, shards {source_sha256}); point factor_stack at "
            "a stack built from this model, or set model to the stack's source")
    layers = sorted({slot.source_layer for slot in manifest.slots_near_seams(config.factor_seam_width)})
    if not layers:
        raise ConfigError(f"factor_stack {config.factor_stack!r} has no seams, so the heal trains no seam slots; "
                          "remove factor_stack to compute factors for every layer")
    return layers


def modules_in_layers(model: nn.Module, modules: dict[str, nn.Linear], layers: list[int]) -> list[str]:
    layer_of = decoder_layer_of(model, modules)
    return [name for name in modules if layer_of[name] in set(layers)]


def factors_metadata(fisher_metadata: dict, config: FisherConfig, sums: FactorSums, layers: list[int]) -> dict:
    """The factors file's metadata: the Fisher's provenance (model and shard hashes, data, counts, how it was
    run), the token count T the moments are divided by, and the basis selection."""
    tokens = {int(count) for count in sums.tokens.values()}
    if len(tokens) != 1:  # every hooked module sees every added example's positions
        raise RuntimeError(f"internal: the K-FAC modules counted different token totals {sorted(tokens)}")
    return {**{key: fisher_metadata[key] for key in _FISHER_PROVENANCE}, "tokens": tokens.pop(),
            "energy_share": config.factor_energy_share, "max_rank": config.factor_max_rank,
            "factor_stack": config.factor_stack, "factor_seam_width": config.factor_seam_width,
            "source_layers": layers}


_FISHER_PROVENANCE = ("model", "model_shard_sha256", "datasets", "dataset_rows", "examples_used", "pairs_used", "mode",
                      "num_samples", "max_length", "seed", "dtype", "world_size", "versions", "config")


def eigenbases(sums: FactorSums, checkpoint_names: dict[str, str], config: FisherConfig,
               device: torch.device) -> dict[str, ModuleFactors]:
    """Checkpoint module name -> the top eigenbases of its A / T and G / T (top_eigenbasis with the config's
    energy share and max rank). Each decomposition runs on `device`, one moment at a time; the bases come
    back on the CPU."""
    factors = {}
    for name in sorted(sums.inputs):
        inputs, outputs = sums.mean(name)
        factors[checkpoint_names[name]] = ModuleFactors(_top(inputs, config, device), _top(outputs, config, device))
    return factors


def _top(moment: torch.Tensor, config: FisherConfig, device: torch.device) -> Eigenbasis:
    basis = top_eigenbasis(moment.to(device), config.factor_energy_share, config.factor_max_rank)
    return Eigenbasis(basis.vectors.cpu(), basis.values.cpu(), basis.trace)


def summarize_factors(factors: dict[str, ModuleFactors]) -> dict[str, dict]:
    """Per module and side: the stored rank, the dimension and the share of the trace the basis holds."""
    return {module: {f"{side}_{key}": value
                     for side, basis in (("input", f.input), ("output", f.output))
                     for key, value in (("rank", basis.vectors.shape[1]), ("dim", basis.vectors.shape[0]),
                                        ("energy", basis.energy))}
            for module, f in sorted(factors.items())}


def log_summary(summary: dict[str, dict]) -> None:
    ranks = {side: [entry[f"{side}_rank"] for entry in summary.values()] for side in ("input", "output")}
    lowest = min(min(entry["input_energy"], entry["output_energy"]) for entry in summary.values())
    logger.info("K-FAC factors of %d modules: input rank median %g (max %d), output rank median %g (max %d), "
                "least energy kept %.3f", len(summary), statistics.median(ranks["input"]), max(ranks["input"]),
                statistics.median(ranks["output"]), max(ranks["output"]), lowest)
