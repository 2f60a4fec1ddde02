"""Coherence and fidelity of several causal LMs side by side: did the stack (or the heal) break the model?

    python -m evaluation --model source=models/e4b --model raw=out/e6b-raw --model healed=out/heal/merged \\
        --reference source --prompts prompts.jsonl --instruct heldout_chat.jsonl --text heldout_text.jsonl \\
        --instructions ifeval.jsonl --tasks tiny_arc,tiny_hellaswag --tasks-dir eval_tasks/ --out out/eval

Every EvalConfig field (evaluation/config.py) is a flag, --key value (--max-new-tokens and --max_new_tokens alike);
--config FILE reads them from a YAML first. Writes eval.json, eval.md and eval.png into --out. The inputs' row
formats, the outputs and the metrics: docs/architecture.md, sections "Inputs of `python -m evaluation`" and "Metrics".
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from core.cli import ConfigParser, load_dataclass, log_config, setup_logging
from core.outputs import OutputExistsError, guard_output_dir
from evaluation.config import EvalConfig, EvalError
from evaluation.report import write_report
from evaluation.run import evaluate_models

logger = logging.getLogger(__name__)


def make_parser() -> ConfigParser:
    parser = ConfigParser(EvalConfig, prog="python -m evaluation", description=__doc__, positional=False,
                          required=False, config_help="YAML of EvalConfig fields (evaluation/config.py)",
                          usage="%(prog)s --model NAME=DIR [--model NAME=DIR ...] [--reference NAME] "
                          "[--config CONFIG] [--key value ...] [--out DIR] [--force]")
    add = parser.add_argument
    add("--model", action="append", required=True, metavar="NAME=DIR",
        help="a model to evaluate (repeatable): a model folder, or a PEFT adapter folder such as a heal's "
        "checkpoint-N/ (merged into its base in memory)")
    add("--reference", help="NAME of the reference model (normally the source): kl_to_reference, length_ratio")
    add("--out", type=Path, default=Path("out/eval"), help="output folder (default: out/eval)")
    add("--force", action="store_true", help="replace an --out that python -m evaluation did not write")
    return parser


def parse_models(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--model {spec!r}: expected NAME=DIR")
        if name in models:
            parser.error(f"--model {name!r} given twice")
        models[name] = Path(folder)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    overrides, args = parser.parse(argv)
    setup_logging()
    models = parse_models(parser, args.model)
    try:
        config = load_dataclass(EvalConfig, args.config, overrides, "a YAML of EvalConfig fields", EvalError)
        log_config(logger, dataclasses.asdict(config))
        guard_output_dir(args.out, "eval", args.force)  # before any model loads: a wrong --out fails in seconds
        write_report(evaluate_models(models, args.reference, config), args.out, force=args.force)
    except (EvalError, OutputExistsError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
