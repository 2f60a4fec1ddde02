"""The evaluation stage, old (heal/evaluate.py at commit 5d2390f) against new (evaluation/), phase by phase on one
non-reference model, and the peak memory of the perplexity as the vocabulary grows.

    .venv/bin/python -m bench.eval_bench speed --model DIR --data DIR [--fixed-new-tokens 96]
    .venv/bin/python -m bench.eval_bench memory [--vocab 32768,131072,262144]

speed takes the converted SmolLM2-135M-Instruct (stack.from_gguf) and the demo data (python -m demo.data DIR), and
writes one JSON line per phase. Method and results: docs/benchmarks.md, section "Evaluation: `bench.eval_bench`".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.measure import run_child
from core.cli import setup_logging
from core.tokens import pad_id
from evaluation import likelihood
from evaluation.config import EvalConfig
from evaluation.generation import greedy_continuations
from evaluation.inputs import load_instruct, load_prompts, load_texts
from evaluation.lm_eval_tasks import lm_eval_items
from evaluation.run import load_model, load_tokenizer

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
OLD_COMMIT = "5d2390f"  # the last commit with heal/evaluate.py, the evaluation before it became its own stage
TASKS = ("chat_reply_choice", "verse_next_line")
TODAY = {"num_prompts": 24, "max_new_tokens": 48, "num_rows": 32, "max_length": 128, "task_limit": 40, "batch_size": 8}


def old_module():
    """heal/evaluate.py as committed at OLD_COMMIT, imported from a temp file (the working tree no longer has it)."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:heal/evaluate.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    # Its one import of a module that has moved since: the staged output, now in the shared core.
    source = source.replace("from stack.atomic import staged_output", "from core.outputs import staged_output")
    path = Path(tempfile.mkdtemp()) / "old_evaluate.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_evaluate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_evaluate"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def speed(model_dir: Path, data: Path, fixed_new_tokens: int, batch_size: int, generation_batch_size: int,
          only: set[str] | None = None) -> list[dict]:
    old = old_module()
    tokenizer = load_tokenizer(model_dir)
    device, dtype = torch.device("cpu"), torch.float32
    model, reference = load_model(model_dir, device, dtype), load_model(model_dir, device, dtype)
    prompts = load_prompts(data / "prompts.jsonl", TODAY["num_prompts"])
    instruct = load_instruct(data / "instruct_heldout.jsonl", TODAY["num_rows"])
    texts = load_texts(data / "text_heldout.jsonl", TODAY["num_rows"])
    pad, chunk = pad_id(tokenizer), EvalConfig.logit_chunk_size
    cap, length = TODAY["max_new_tokens"], TODAY["max_length"]
    backbone = likelihood.Backbone(model)
    examples = likelihood.encode_response_examples(tokenizer, instruct, max_length=length)
    states = likelihood.reference_states(likelihood.Backbone(reference), examples, pad, batch_size)
    encoded = likelihood.encode_texts(tokenizer, texts, length)
    phases = {
        "generate": (lambda: old.greedy_continuations(model, tokenizer, prompts, cap, TODAY["batch_size"]),
                     lambda: greedy_continuations(model, tokenizer, prompts, cap, 0, generation_batch_size)),
        f"generate+fixed{fixed_new_tokens}": (None, lambda: greedy_continuations(
            model, tokenizer, prompts, cap, fixed_new_tokens, generation_batch_size)),
        "kl": (lambda: old.mean_kl_to_reference(model, reference, tokenizer, instruct, TODAY["batch_size"],
                                                max_length=length),
               lambda: likelihood.kl_rows(backbone, states, examples, pad, batch_size, chunk)),
        "perplexity": (lambda: old.perplexity(model, tokenizer, texts, length, TODAY["batch_size"]),
                       lambda: likelihood.nll_rows(backbone, encoded, pad, batch_size, chunk)),
        "lm_eval": (lambda: old.lm_eval_scores(model, tokenizer, TASKS, data / "lm_eval_tasks", TODAY["batch_size"], 0,
                                               TODAY["task_limit"]),
                    lambda: lm_eval_items(model, tokenizer, TASKS, data / "lm_eval_tasks", batch_size, 0,
                                          TODAY["task_limit"])),
    }
    rows = []
    for phase, (old_run, new_run) in phases.items():
        if only and phase not in only:
            continue
        row = {"phase": phase, "old_s": round(timed(old_run), 2) if old_run else None,
               "new_s": round(timed(new_run), 2), "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    total = {"phase": "total (today's sizes)", "old_s": round(sum(r["old_s"] for r in rows if r["old_s"]), 2),
             "new_s": round(sum(r["new_s"] for r in rows if r["old_s"]), 2)}
    print(json.dumps(total), flush=True)
    return rows + [total]


# ---- memory ----------------------------------------------------------------------------------------------------


def memory_child(path: str, vocab: int, rows: int, length: int) -> None:
    """One measurement, in this (child) process: build the model, then score unless `path` is "baseline"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    encoded = torch.randint(3, vocab, (rows, length)).tolist()
    if path == "new":
        likelihood.nll_rows(likelihood.Backbone(model), encoded, pad=0, batch_size=rows, chunk_size=256)
    elif path == "old":  # the old perplexity's core: full logits, then cross_entropy (heal/evaluate.py at OLD_COMMIT)
        with torch.inference_mode():
            ids = torch.tensor(encoded)
            logits = model(input_ids=ids).logits[:, :-1].float()
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def memory(vocabs: list[int], rows: int, length: int, scratch: Path) -> list[dict]:
    results = []
    for vocab in vocabs:
        peaks = {}
        for path in ("baseline", "old", "new"):
            command = [sys.executable, "-m", "bench.eval_bench", "memory-child", path, str(vocab), str(rows),
                       str(length)]
            peaks[path] = run_child(command, scratch / f"memory-{path}-{vocab}.log").peak_rss_bytes
        row = {"vocab": vocab, "rows": rows, "length": length,
               "old_extra_MiB": round((peaks["old"] - peaks["baseline"]) / 2**20),
               "new_extra_MiB": round((peaks["new"] - peaks["baseline"]) / 2**20),
               "full_fp32_logits_MiB": round(rows * length * vocab * 4 / 2**20)}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    speed_parser = sub.add_parser("speed")
    speed_parser.add_argument("--model", type=Path, required=True)
    speed_parser.add_argument("--data", type=Path, required=True)
    speed_parser.add_argument("--fixed-new-tokens", type=int, default=96)
    speed_parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size,
                              help="the new code's batch size")
    speed_parser.add_argument("--generation-batch-size", type=int, default=EvalConfig.generation_batch_size)
    speed_parser.add_argument("--phases", help="comma-separated phases to run (default: all)")
    memory_parser = sub.add_parser("memory")
    memory_parser.add_argument("--vocab", default="32768,131072,262144")
    memory_parser.add_argument("--rows", type=int, default=8)
    memory_parser.add_argument("--length", type=int, default=256)
    memory_parser.add_argument("--scratch", type=Path, default=Path(".bench-scratch/eval-memory"))
    child = sub.add_parser("memory-child")
    for name in ("path", "vocab", "rows", "length"):
        child.add_argument(name)
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    if args.command == "speed":
        speed(args.model, args.data, args.fixed_new_tokens, args.batch_size, args.generation_batch_size,
              set(args.phases.split(",")) if args.phases else None)
    elif args.command == "memory":
        memory([int(v) for v in args.vocab.split(",")], args.rows, args.length, args.scratch)
    else:
        memory_child(args.path, int(args.vocab), int(args.rows), int(args.length))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
