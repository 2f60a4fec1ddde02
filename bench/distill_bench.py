"""Peak memory and step time of `objective: distill` against SFT, on the same stack, data and budget.

    .venv/bin/python -m bench.distill_bench [--scratch .bench-scratch/distill] [--length 1024] [--steps 4]

Three variants, sft, distill (chunked KL) and distill-1chunk (every position in one chunk), each a heal/train.py
run in its own process on a tiny stacked Gemma-4 with E4B's real 262,144-token vocabulary. Method and results:
docs/benchmarks.md, section "Heal: distillation against SFT".
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml

from bench.checkpoints import tiny_e6b
from bench.measure import bench_parser, run_child
from core.cli import setup_logging

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
    setup_logging()
    parser = bench_parser("python -m bench.distill_bench", __doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="tokens per row")
    parser.add_argument("--scratch", type=Path, default=Path(".bench-scratch/distill"))
    args = parser.parse_args(argv)
    stack = tiny_e6b(args.scratch, vocab_size=GEMMA_VOCAB, vocab_size_per_layer_input=GEMMA_VOCAB)
    if stack is None:
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
