"""Step time of Fisher-protected LoRA against plain LoRA, same model and batches, in one run.

    .venv/bin/python -m bench.heal_bench [--steps 6] [--rounds 3] [--length 256] [--batch-size 4]

LoRA r=16 on 84 modules of a random Llama with SmolLM2-135M's shape, the two variants alternating for `rounds`
rounds; the median step time of each is reported. Method and results: docs/benchmarks.md, section "Heal:
protection overhead".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench.fisher_bench import SMOLLM2_SHAPE
from bench.measure import bench_parser, markdown_table
from heal.protection import attach, bake, plan_protection

LAYERS = range(9, 21)
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build(protect: bool, targets: list[str], plan):
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)), lora)
    if protect:
        attach(model, plan)
        bake(model, plan)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    return model, optimizer


def seconds_per_step(model, optimizer, batch, steps: int) -> float:
    model(input_ids=batch, labels=batch).loss.backward()  # warm-up
    optimizer.zero_grad()
    started = time.perf_counter()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    args = step_parser("python -m bench.heal_bench", __doc__, steps=6, length=256, batch_size=4).parse_args(argv)
    targets = [f"model.layers.{layer}.{kind}" for layer in LAYERS for kind in KINDS]
    generator = torch.Generator().manual_seed(0)
    plan = plan_protection(random_fisher(SMOLLM2_SHAPE, targets, generator), targets, mass_share=0.75,
                           max_fraction=0.25)
    batch = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (args.batch_size, args.length), generator=generator)
    times = {"plain LoRA": [], "protected LoRA": []}
    for _ in range(args.rounds):
        for label, protect in (("plain LoRA", False), ("protected LoRA", True)):
            model, optimizer = build(protect, targets, plan)
            times[label].append(seconds_per_step(model, optimizer, batch, args.steps))
    print_overhead(times, len(targets), args.batch_size * args.length, digits=3)
    return 0


def step_parser(prog: str, description: str, steps: int, length: int, batch_size: int) -> argparse.ArgumentParser:
    """A step-time benchmark's command line: steps per round, rounds, tokens per row, rows per step."""
    parser = bench_parser(prog, description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=length)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    return parser


def random_fisher(shape: dict, targets: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A heavy-tailed random Fisher (uniform⁴) for each target's weight of a Llama of `shape`."""
    reference = LlamaForCausalLM(LlamaConfig(**shape))
    return {f"{n}.weight": torch.rand(reference.get_submodule(n).weight.shape, generator=generator) ** 4
            for n in targets}


def print_overhead(times: dict[str, list[float]], modules: int, tokens: int, digits: int) -> None:
    """The raw times as JSON, then the median step time of the two variants (plain first) and the overhead."""
    (plain_label, plain_times), (other_label, other_times) = times.items()
    plain, other = statistics.median(plain_times), statistics.median(other_times)
    print(json.dumps({"threads": torch.get_num_threads(), "modules": modules, "times_s": times}, indent=2))
    print()
    print(markdown_table(["tokens/step", "LoRA modules", f"{plain_label} s/step", f"{other_label} s/step", "overhead"],
                         [[str(tokens), str(modules), f"{plain:.{digits}f}", f"{other:.{digits}f}",
                           f"{100 * (other / plain - 1):+.1f}%"]]))

if __name__ == "__main__":
    raise SystemExit(main())
