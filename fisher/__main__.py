"""Diagonal Fisher importance of a (source, instruction-tuned) model on instruction data.

    python -m fisher recipes/fisher.yaml [--model PATH_OR_HUB_ID] [--data PATH] [--out DIR] [--force] [--key value]
    accelerate launch --num_processes 8 -m fisher recipes/fisher.yaml     # data sharded over ranks

Writes OUT/fisher.safetensors (one fp32 tensor per decoder Linear weight, named and shaped as in
the source checkpoint, with the run's metadata), OUT/fisher_summary.json and OUT/fisher.png.
The file format is documented in docs/architecture.md ("The Fisher file").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from core.checkpoint import SourceError, check_data_present, open_source
from core.cli import ConfigParser, log_config, package_versions, setup_logging
from core.data import DataError
from core.outputs import OutputExistsError, guard_output_dir, staged_output
from core.tokens import pad_id

from .config import ConfigError, FisherConfig, config_to_dict, load_config
from .data import load_examples
from .estimator import Accumulator, FactorSums, decoder_linears
from .factors import FACTORS_FILE, ModuleFactors, save_factors
from .file import FISHER_FILE, FORMAT_VERSION, METADATA_KEY
from .kfac import (
    eigenbases,
    factor_layers,
    factors_metadata,
    log_summary,
    modules_in_layers,
    shard_sha256,
    summarize_factors,
)
from .report import plot, summarize
from .run import NonFiniteError, finalize, prepare_for_fisher, reduce_counts, run_fisher

logger = logging.getLogger("fisher")

SUMMARY_FILE = "fisher_summary.json"
PLOT_FILE = "fisher.png"


def make_parser() -> ConfigParser:
    parser = ConfigParser(FisherConfig, prog="python -m fisher", description=__doc__,
                          config_help="Fisher recipe YAML (fields of fisher.config.FisherConfig)")
    parser.add_argument("--data", help="one dataset: a JSONL/parquet/arrow path or hub name; short for "
                        "--datasets '[{path: PATH}]'")
    parser.add_argument("--force", action="store_true", help="replace an --out that `python -m fisher` did not write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    overrides, args = parser.parse(argv)
    if args.data is not None:
        if "datasets" in overrides:
            parser.error("give --data or --datasets, not both")
        overrides["datasets"] = [{"path": args.data}]
    setup_logging()
    try:
        config = load_config(args.config, **overrides)
        compute_and_write(config, force=args.force)
    except (ConfigError, DataError, NonFiniteError, SourceError, FileNotFoundError, OutputExistsError) as error:
        logger.error("%s", error)
        return 2
    return 0


def compute_and_write(config: FisherConfig, force: bool = False) -> None:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    guard_output_dir(Path(config.out), "fisher", force)  # a wrong `out` fails before any model or data loads
    accelerator = Accelerator()
    is_main = accelerator.is_main_process
    if is_main:
        log_config(logger, config_to_dict(config))
    source = open_source(config.model)  # local folder (or HF cache), shard list and headers
    check_data_present(source)  # a truncated shard fails here, not inside from_pretrained
    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    with accelerator.main_process_first():  # before the model: bad data fails in seconds
        examples, stats = load_examples(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=getattr(torch, config.dtype))
    prepare_for_fisher(model, config)
    model.to(accelerator.device)
    modules = decoder_linears(model)
    # With factor_stack every rank hashes the shards now: a stack of another model fails before the passes.
    source_sha256 = shard_sha256(source) if config.factor_stack else None
    layers = factor_layers(config, len(model.get_decoder().layers), source_sha256) if config.factors else []
    factor_sums = FactorSums(modules_in_layers(model, modules, layers)) if config.factors else None
    accumulator = Accumulator(modules, config.estimator, config.examples_per_chunk, factor_sums)
    counts = run_fisher(model, accumulator, examples, config, pad_id(tokenizer), accelerator.process_index,
                        accelerator.num_processes)
    counts = reduce_counts(counts, accumulator, accelerator)
    fisher = checkpoint_names(model, finalize(accumulator, counts, config))
    if not is_main:
        return
    _check_against_source(fisher, source)
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": config.model,
        "model_shard_sha256": source_sha256 or shard_sha256(source),
        "datasets": [dataclasses.asdict(d) for d in config.datasets],
        "dataset_rows": stats.rows,
        "examples_used": counts.examples - len(set(counts.nonfinite_examples)),
        "examples_seen": counts.examples,
        "pairs_used": counts.pairs_used,
        "skipped_empty_loss_mask": stats.skipped_empty_loss_mask,
        "skipped_nonfinite": counts.pairs_nonfinite,
        "truncated": stats.truncated,
        "loss_tokens": counts.loss_tokens,
        "mode": config.mode,
        "num_samples": config.num_samples,
        "estimator": config.estimator,
        "approximate": config.approximate,
        "max_length": config.max_length,
        "seed": config.seed,
        "dtype": config.dtype,
        "world_size": accelerator.num_processes,
        "versions": package_versions("torch", "transformers", "trl", "accelerate", "e6b-heal"),
        "config": config_to_dict(config),
    }
    if factor_sums is None:
        write_outputs(Path(config.out), fisher, metadata)
        return
    names = checkpoint_module_names(model, {name: modules[name] for name in factor_sums.names})
    factors = eigenbases(factor_sums, names, config, accelerator.device)
    _check_factors_against_source(factors, source)
    write_outputs(Path(config.out), fisher, metadata, factors, factors_metadata(metadata, config, factor_sums, layers))


def checkpoint_names(model, fisher_by_module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> the weight's name as save_pretrained writes it (and the source checkpoint holds it)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {f"{name}.weight": values for name, values in fisher_by_module.items()})


def checkpoint_module_names(model, modules: dict[str, torch.nn.Linear]) -> dict[str, str]:
    """Module name -> the module's name in the source checkpoint: its weight's checkpoint name (checkpoint_names)
    without ".weight", so the factors are keyed like the Fisher's tensors."""
    names = {}
    for name, module in modules.items():
        (weight_name,) = checkpoint_names(model, {name: module.weight})
        names[name] = weight_name.removesuffix(".weight")
    return names


def _check_factors_against_source(factors: dict[str, ModuleFactors], source) -> None:
    """Each module's bases span its source weight [out, in]: output vectors [out, k'], input vectors [in, k]."""
    for module, module_factors in factors.items():
        info = source.tensors.get(f"{module}.weight")
        dims = (module_factors.output.vectors.shape[0], module_factors.input.vectors.shape[0])
        if info is None or dims != info.shape:
            raise RuntimeError(f"internal: K-FAC factors of {module} ({dims}) have no match in {source.model!r}")


def _check_against_source(fisher: dict[str, torch.Tensor], source) -> None:
    for name, values in fisher.items():
        info = source.tensors.get(name)
        if info is None or tuple(values.shape) != info.shape:
            raise RuntimeError(f"internal: Fisher tensor {name} {list(values.shape)} has no match in {source.model!r}")


def write_outputs(out_dir: Path, fisher: dict[str, torch.Tensor], metadata: dict,
                  factors: dict[str, ModuleFactors] | None = None, factor_metadata: dict | None = None) -> None:
    """fisher.safetensors, the summary and the plot, and with `factors` fisher_factors.safetensors, in one staged
    folder."""
    from safetensors.torch import save_file

    summary = summarize(fisher)
    if factors is not None:
        summary["factors"] = summarize_factors(factors)
        log_summary(summary["factors"])
    with staged_output(out_dir, stage="fisher") as tmp:
        tensors = {name: values.detach().to("cpu", torch.float32).contiguous()
                   for name, values in sorted(fisher.items())}
        save_file(tensors, tmp / FISHER_FILE, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})
        if factors is not None:
            save_factors(tmp / FACTORS_FILE, factors, factor_metadata)
        (tmp / SUMMARY_FILE).write_text(json.dumps({"metadata": metadata, **summary}, indent=2) + "\n")
        plot(summary, tmp / PLOT_FILE, f"Fisher ({metadata['mode']}, {metadata['estimator']}) of {metadata['model']}")
    logger.info("wrote %s: %d tensors, %d examples, %d loss tokens", out_dir, len(fisher), metadata["pairs_used"],
                metadata["loss_tokens"])


if __name__ == "__main__":
    sys.exit(main())
