"""Coherence and fidelity of several causal LMs side by side: did the stack (or the heal) break the model?

    python -m evaluation --model source=models/e4b --model raw=out/e6b-raw --model healed=out/heal/merged \\
        --reference source --prompts prompts.jsonl --instruct heldout_chat.jsonl --text heldout_text.jsonl \\
        --instructions ifeval.jsonl --tasks tiny_arc,tiny_hellaswag --tasks-dir eval_tasks/ --out out/eval

Inputs (JSONL, one object a line; every one optional, a metric without its input is left out):
  --prompts       {"prompt": "text"}, {"prompt": [messages]} or {"messages": [messages]} (trailing assistant
                  turns are dropped, so a chat file can serve as prompts); rendered with the chat template and
                  add_generation_prompt=True.
  --instruct      TRL "messages" rows: [{"role", "content"}, ...], the last message the assistant's, or
                  conversational prompt/completion rows.
  --text          {"text": "..."} rows.
  --instructions  IFEval rows {"key", "prompt", "instruction_id_list", "kwargs"} (evaluation/ifeval.py).
  --tasks         lm-eval-harness task names, defined by the YAMLs in --tasks-dir (local data, no hub).

The metrics are defined in evaluation/__init__.py. Outputs, in --out (written beside it, then renamed into
place): eval.json, eval.md and eval.png. An --out that this stage did not write is refused without --force,
before any model loads. Models are loaded one at a time, on --device in --dtype (auto: bf16 on a GPU, fp32
on the CPU).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from evaluation.config import DTYPES, EvalConfig, EvalError
from evaluation.report import write_report
from evaluation.run import evaluate_models
from stack.atomic import OutputExistsError, guard_output_dir

logger = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", action="append", required=True, metavar="NAME=DIR",
        help="a model to evaluate (repeatable): a model folder, or a PEFT adapter folder such as a heal's "
        "checkpoint-N/ (merged into its base in memory)")
    add("--reference", help="NAME of the reference model (normally the source): kl_to_reference, length_ratio")
    add("--prompts", type=Path, help="JSONL of chat prompts")
    add("--instruct", type=Path, help='JSONL of TRL "messages" rows, the last message the assistant\'s')
    add("--text", type=Path, help='JSONL of {"text": ...} rows')
    add("--instructions", type=Path, help="JSONL of IFEval-format verifiable-instruction prompts")
    add("--tasks", default="", help="comma-separated lm-eval task names")
    add("--tasks-dir", type=Path, help="folder of lm-eval task YAMLs")
    add("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens, help="cap of the natural-stop continuations")
    add("--fixed-new-tokens", type=int, default=EvalConfig.fixed_new_tokens,
        help="length of the length-controlled continuations, stop tokens suppressed until then (0: none)")
    add("--batch-size", type=int, default=EvalConfig.batch_size, help="rows per teacher-forced forward")
    add("--generation-batch-size", type=int, default=EvalConfig.generation_batch_size,
        help="prompts decoded together")
    add("--max-length", type=int, default=EvalConfig.max_length,
        help="tokens per --text row and --instruct conversation")
    add("--logit-chunk-size", type=int, default=EvalConfig.logit_chunk_size,
        help="positions whose logits exist at once in the KL and the perplexity")
    add("--num-prompts", type=int, help="use the first N prompts")
    add("--num-rows", type=int, help="use the first N rows of --instruct and --text")
    add("--task-limit", type=int, help="lm-eval: use the first N documents of each task")
    add("--seed", type=int, default=EvalConfig.seed)
    add("--bootstrap-resamples", type=int, default=EvalConfig.bootstrap_resamples)
    add("--device", choices=("auto", "cuda", "cpu"), default=EvalConfig.device)
    add("--dtype", choices=("auto", *DTYPES), default=EvalConfig.dtype)
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


def _check_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("max_new_tokens", "batch_size", "generation_batch_size", "max_length", "logit_chunk_size",
                 "bootstrap_resamples"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.fixed_new_tokens < 0:
        parser.error(f"--fixed-new-tokens must be 0 (none) or more, got {args.fixed_new_tokens}")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = parse_models(parser, args.model)
    _check_sizes(parser, args)
    config = EvalConfig(
        prompts=args.prompts, instruct=args.instruct, text=args.text, instructions=args.instructions,
        tasks=tuple(t for t in args.tasks.split(",") if t), tasks_dir=args.tasks_dir,
        max_new_tokens=args.max_new_tokens, fixed_new_tokens=args.fixed_new_tokens, batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size,
        max_length=args.max_length, logit_chunk_size=args.logit_chunk_size, num_prompts=args.num_prompts,
        num_rows=args.num_rows, task_limit=args.task_limit, seed=args.seed,
        bootstrap_resamples=args.bootstrap_resamples, device=args.device, dtype=args.dtype,
    )
    try:
        guard_output_dir(args.out, "eval", args.force)  # before any model loads: a wrong --out fails in seconds
        write_report(evaluate_models(models, args.reference, config), args.out, force=args.force)
    except (EvalError, OutputExistsError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
