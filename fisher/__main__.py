"""Diagonal Fisher importance of a (source, instruction-tuned) model on instruction data.

    python -m fisher recipes/fisher.yaml [--model PATH_OR_HUB_ID] [--data PATH] [--out DIR] [--force]
    accelerate launch --num_processes 8 -m fisher recipes/fisher.yaml     # data sharded over ranks

Writes OUT/fisher.safetensors (one fp32 tensor per decoder Linear weight, named and shaped as in
the source checkpoint, with the run's metadata), OUT/fisher_summary.json and OUT/fisher.png.
The file format is documented in docs/architecture.md ("The Fisher file").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import sys
from pathlib import Path

import torch

from stack.atomic import OutputExistsError, guard_output_dir, staged_output
from stack.source import SourceError, check_data_present, open_source, sha256_file

from .config import ConfigError, FisherConfig, config_to_dict, load_config
from .data import DataError, load_examples
from .estimator import Accumulator, decoder_linears
from .file import FISHER_FILE, FORMAT_VERSION, METADATA_KEY
from .report import plot, summarize
from .run import NonFiniteError, finalize, prepare_for_fisher, reduce_counts, run_fisher

logger = logging.getLogger("fisher")

SUMMARY_FILE = "fisher_summary.json"
PLOT_FILE = "fisher.png"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fisher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="Fisher recipe YAML (fields of fisher.config.FisherConfig)")
    parser.add_argument("--model", help="model folder or hub id (overrides `model`)")
    parser.add_argument("--data", help="one dataset: a JSONL/parquet/arrow path or hub name (overrides `datasets`)")
    parser.add_argument("--out", help="output folder (overrides `out`)")
    parser.add_argument("--force", action="store_true", help="replace an --out that `python -m fisher` did not write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, model=args.model, datasets=args.data, out=args.out)
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
        logger.info("resolved config:\n%s", json.dumps(config_to_dict(config), indent=2))
    source = open_source(config.model)  # local folder (or HF cache), shard list and headers
    check_data_present(source)  # a truncated shard fails here, not inside from_pretrained
    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    with accelerator.main_process_first():  # before the model: bad data fails in seconds
        examples, stats = load_examples(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=getattr(torch, config.dtype))
    prepare_for_fisher(model, config)
    model.to(accelerator.device)
    modules = decoder_linears(model)
    accumulator = Accumulator(modules, config.estimator, config.examples_per_chunk)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = run_fisher(model, accumulator, examples, config, pad_id, accelerator.process_index,
                        accelerator.num_processes)
    counts = reduce_counts(counts, accumulator, accelerator)
    fisher = checkpoint_names(model, finalize(accumulator, counts, config))
    if not is_main:
        return
    _check_against_source(fisher, source)
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": config.model,
        "model_shard_sha256": {p.name: sha256_file(p) for p in source.shards},
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
        "versions": {name: importlib.metadata.version(name)
                     for name in ("torch", "transformers", "trl", "accelerate", "e6b-heal")},
        "config": config_to_dict(config),
    }
    write_outputs(Path(config.out), fisher, metadata)


def checkpoint_names(model, fisher_by_module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> the weight's name as save_pretrained writes it (and the source checkpoint holds it)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {f"{name}.weight": values for name, values in fisher_by_module.items()})


def _check_against_source(fisher: dict[str, torch.Tensor], source) -> None:
    for name, values in fisher.items():
        info = source.tensors.get(name)
        if info is None or tuple(values.shape) != info.shape:
            raise RuntimeError(f"internal: Fisher tensor {name} {list(values.shape)} has no match in {source.model!r}")


def write_outputs(out_dir: Path, fisher: dict[str, torch.Tensor], metadata: dict) -> None:
    from safetensors.torch import save_file

    summary = summarize(fisher)
    with staged_output(out_dir, stage="fisher") as tmp:
        tensors = {name: values.detach().to("cpu", torch.float32).contiguous()
                   for name, values in sorted(fisher.items())}
        save_file(tensors, tmp / FISHER_FILE, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})
        (tmp / SUMMARY_FILE).write_text(json.dumps({"metadata": metadata, **summary}, indent=2) + "\n")
        plot(summary, tmp / PLOT_FILE, f"Fisher ({metadata['mode']}, {metadata['estimator']}) of {metadata['model']}")
    logger.info("wrote %s: %d tensors, %d examples, %d loss tokens", out_dir, len(fisher), metadata["pairs_used"],
                metadata["loss_tokens"])


if __name__ == "__main__":
    sys.exit(main())
