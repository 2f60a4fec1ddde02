"""Peak memory and step time of `objective: distill` against SFT, on the same stack, data and budget.

    .venv/bin/python -m bench.distill_bench [--scratch .bench-scratch/distill] [--length 1024] [--steps 4]

The model is a tiny Gemma-4 with E4B's structure and E4B's real vocabulary, 262,144 tokens (PLE
included), hidden 64: the logits, not the body, dominate memory, as they do for distillation at
scale. It is stacked with the seed recipe (42 -> 66 layers) and healed by heal/train.py, each variant
in its own process (peak RSS from wait4), on the same rows of `--length` tokens, batch 1, fp32:

  sft             the SFT label loss (TRL's fused, chunked LM head)
  distill         alpha 0.5: KL(source ‖ student) in chunks of 256 positions + the label loss
  distill-1chunk  the same with every position in one chunk: what an unchunked KL costs

Step time is train_runtime / steps from each run's train_results.json (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import yaml

from bench.measure import run_child
from stack.__main__ import main as stack_main
from stack.tiny import save_tiny_gemma4

REPO = Path(__file__).resolve().parents[1]
GEMMA_VOCAB = 262_144

VARIANTS = {
    "sft": {"objective": "sft"},
    "distill": {"objective": "distill", "distill_alpha": 0.5, "distill_chunk_size": 256},
    "distill-1chunk": {"objective": "distill", "distill_alpha": 0.5, "distill_chunk_size": 1 << 20},
}


def write_rows(path: Path, count: int, length: int) -> Path:
    """Plain-text rows of `length` random vocabulary words (one token each in the tiny tokenizer)."""
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(count):
            text = " ".join(f"w{rng.randrange(GEMMA_VOCAB - 16)}" for _ in range(length - 1))
            out.write(json.dumps({"text": text}) + "\n")
    return path


def heal_recipe(path: Path, stack: Path, data: Path, output_dir: Path, length: int, steps: int, **overrides) -> Path:
    recipe = {
        "stack": str(stack), "datasets": [{"path": str(data)}], "protect": False, "seam_width": 2, "merge": False,
        "output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": 1, "max_length": length,
        "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "bf16": False, "activation_checkpointing": False, "seed": 0, **overrides,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.distill_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path(".bench-scratch/distill"))
    parser.add_argument("--length", type=int, default=1024, help="tokens per row")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    source = save_tiny_gemma4(args.scratch / "e4b", vocab_size=GEMMA_VOCAB, vocab_size_per_layer_input=GEMMA_VOCAB)
    stack = args.scratch / "e6b"
    if stack_main([str(REPO / "recipes" / "e6b.yaml"), "--source", str(source), "--out", str(stack)]) != 0:
        return 1
    data = write_rows(args.scratch / "rows.jsonl", args.steps + 1, args.length)
    rows = []
    for name, overrides in VARIANTS.items():
        out = args.scratch / name
        recipe = heal_recipe(args.scratch / f"{name}.yaml", stack, data, out, args.length, args.steps, **overrides)
        run = run_child([sys.executable, str(REPO / "heal" / "train.py"), str(recipe)], args.scratch / f"{name}.log")
        runtime = json.loads((out / "train_results.json").read_text())["train_runtime"]
        rows.append((name, runtime / args.steps, run.peak_rss_bytes / 2**30, run.wall_s))
    print(f"\nvocab {GEMMA_VOCAB}, {args.length} tokens/step, {args.steps} steps\n")
    print("| variant | s/step | peak RSS (GiB) | process wall (s) |\n|---|---:|---:|---:|")
    for name, step, rss, wall in rows:
        print(f"| {name} | {step:.2f} | {rss:.2f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
