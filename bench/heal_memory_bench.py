"""heal.plan's memory estimate against a measured peak: real heals on the CPU, where RSS can be read.

    .venv/bin/python -m bench.heal_memory_bench [--scratch .bench-scratch/heal-memory] [--length 256] [--batch-size 4]

Two-step heals of a stacked Gemma-4 with E4B's structure at hidden 256, activation checkpointing off and on, each
in its own process, against heal.plan's estimate in CPU terms. Method and results: docs/benchmarks.md, section
"Heal: `--plan`'s memory estimate against a measured peak".
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml

from bench.checkpoints import tiny_e6b
from bench.measure import bench_parser, files_bytes, run_child
from core.cli import setup_logging
from heal.plan import GB, build_heal_plan, load_recipe

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
    parser = bench_parser("python -m bench.heal_memory_bench", __doc__)
    parser.add_argument("--scratch", type=Path, default=Path(".bench-scratch/heal-memory"))
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    setup_logging()
    stack = tiny_e6b(args.scratch, **WIDTHS)
    if stack is None:
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
