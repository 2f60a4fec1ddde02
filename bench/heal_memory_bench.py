"""heal.plan's memory estimate against a measured peak: real heals on the CPU, where RSS can be read.

    .venv/bin/python -m bench.heal_memory_bench [--scratch .bench-scratch/heal-memory] [--length 256] [--batch-size 4]

A Gemma-4 with E4B's structure (42 layers, KV sharing, PLE, towers) at hidden 256 is stacked with the
seed recipe (42 -> 66 layers) and healed by heal/train.py (LoRA on the seam slots, fp32, 2 steps), with
activation checkpointing off and on, each in its own process (peak RSS from wait4). A baseline process
imports the same libraries and loads the tokenizer and data: its peak RSS is the Python/torch runtime,
subtracted from each heal's. The estimate is heal.plan's, in CPU terms (fp32 weights, no ZeRO, no CUDA
overhead, the torch LM-head fold), taking the larger of two peaks: loading (fp32 weights + the bf16
checkpoint pages mapped while they are converted) and training (the memory model's sum).
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

from bench.measure import files_bytes, run_child
from heal.plan import GB, build_heal_plan, load_recipe
from stack.__main__ import main as stack_main
from stack.tiny import save_tiny_gemma4

REPO = Path(__file__).resolve().parents[1]
WIDTHS = dict(hidden_size=256, intermediate_size=1024, vocab_size=4096, vocab_size_per_layer_input=4096,
              hidden_size_per_layer_input=16)
BASELINE = ("import sys, heal.train, heal.plan, datasets\nfrom transformers import AutoTokenizer\n"
            "AutoTokenizer.from_pretrained(sys.argv[1]); datasets.load_dataset('json', data_files=sys.argv[2])")


def write_rows(path: Path, count: int, length: int, vocab: int) -> Path:
    """Plain-text rows of `length` random words (one token each in the tiny tokenizer)."""
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(count):
            out.write(json.dumps({"text": " ".join(f"w{rng.randrange(vocab - 16)}" for _ in range(length))}) + "\n")
    return path


def heal_recipe(path: Path, stack: Path, data: Path, output_dir: Path, batch: int, length: int,
                checkpointing: bool) -> Path:
    recipe = {
        "stack": str(stack), "datasets": [{"path": str(data)}], "protect": False, "seam_width": 2, "merge": False,
        "output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": batch, "max_length": length,
        "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "bf16": False, "activation_checkpointing": checkpointing, "seed": 0,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def estimate(recipe: Path, stack: Path) -> tuple[dict[str, int], int]:
    """heal.plan's components on the CPU, one process, and the peak: max(loading, training)."""
    heal, sft = load_recipe(str(recipe))
    plan = build_heal_plan(heal, sft, device="cpu")
    components = plan.memory("no ZeRO", 1)
    loading = components["weights"] + files_bytes(stack, "*.safetensors")
    return components, max(loading, sum(components.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heal_memory_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=Path(".bench-scratch/heal-memory"))
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    source = save_tiny_gemma4(args.scratch / "e4b", **WIDTHS)
    stack = args.scratch / "e6b"
    if stack_main([str(REPO / "recipes" / "e6b.yaml"), "--source", str(source), "--out", str(stack)]) != 0:
        return 1
    data = write_rows(args.scratch / "rows.jsonl", 4 * args.batch_size, args.length, WIDTHS["vocab_size"])
    baseline = run_child([sys.executable, "-c", BASELINE, str(stack), str(data)], args.scratch / "baseline.log")
    rows = []
    for checkpointing in (False, True):
        name = f"checkpointing-{'on' if checkpointing else 'off'}"
        recipe = heal_recipe(args.scratch / f"{name}.yaml", stack, data, args.scratch / name, args.batch_size,
                             args.length, checkpointing)
        run = run_child([sys.executable, str(REPO / "heal" / "train.py"), str(recipe)], args.scratch / f"{name}.log")
        components, estimated = estimate(recipe, stack)
        measured = run.peak_rss_bytes - baseline.peak_rss_bytes
        rows.append((name, measured, estimated, components))
    print(f"\nbaseline (runtime, tokenizer, data) peak RSS {baseline.peak_rss_bytes / GB:.3f} GB; "
          f"batch {args.batch_size} x {args.length} tokens, fp32, hidden {WIDTHS['hidden_size']}, 66 layers\n")
    print("| run | measured peak RSS − baseline (GB) | heal.plan estimate (GB) | estimate / measured "
          "| components (GB) |")
    print("|---|---:|---:|---:|---|")
    for name, measured, estimated, components in rows:
        parts = ", ".join(f"{key} {value / GB:.3f}" for key, value in components.items() if value)
        print(f"| {name} | {measured / GB:.3f} | {estimated / GB:.3f} | {estimated / measured:.2f} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
