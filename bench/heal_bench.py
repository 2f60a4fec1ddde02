"""Step time of Fisher-protected LoRA against plain LoRA, same model and batches, in one run.

    .venv/bin/python -m bench.heal_bench [--steps 6] [--rounds 3] [--length 256] [--batch-size 4]

The model is a random Llama with SmolLM2-135M's shape (30 layers, hidden 576). LoRA r=16 goes on
all seven projections of 12 layers (84 modules). The protection plan comes from a random positive
"Fisher": mass_share 0.75, max_fraction 0.25. A step is forward, backward and AdamW. The two
variants alternate for `rounds` rounds, so drift on the machine hits both; the median per-step
time of each is reported.
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
from heal.protection import ProtectionConfig, attach, bake, plan_protection

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
    parser = argparse.ArgumentParser(prog="python -m bench.heal_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    targets = [f"model.layers.{layer}.{kind}" for layer in LAYERS for kind in KINDS]
    reference = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    generator = torch.Generator().manual_seed(0)
    fisher = {f"{n}.weight": torch.rand(reference.get_submodule(n).weight.shape, generator=generator) ** 4
              for n in targets}
    plan = plan_protection(fisher, targets, ProtectionConfig(mass_share=0.75, max_fraction=0.25))
    batch = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (args.batch_size, args.length), generator=generator)
    times = {"plain LoRA": [], "protected LoRA": []}
    for _ in range(args.rounds):
        for label, protect in (("plain LoRA", False), ("protected LoRA", True)):
            model, optimizer = build(protect, targets, plan)
            times[label].append(seconds_per_step(model, optimizer, batch, args.steps))
    plain, protected = (statistics.median(times[k]) for k in ("plain LoRA", "protected LoRA"))
    print(json.dumps({"threads": torch.get_num_threads(), "modules": len(targets), "times_s": times}, indent=2))
    print("\n| tokens/step | LoRA modules | plain LoRA s/step | protected LoRA s/step | overhead |\n"
          "|---:|---:|---:|---:|---:|\n"
          f"| {args.batch_size * args.length} | {len(targets)} | {plain:.3f} | {protected:.3f} "
          f"| {100 * (protected / plain - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
