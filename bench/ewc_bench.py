"""Step time of LoRA with the soft Fisher penalty (`protection: ewc`) against plain LoRA, same model and batches.

    .venv/bin/python -m bench.ewc_bench [--steps 4] [--rounds 3] [--length 128] [--batch-size 2]

LoRA r=16 on the seven projections of every layer of a small random Llama (4 layers, hidden 256: 28 modules); a
step is forward, backward and AdamW, the penalised one run as HealTrainer.compute_loss runs it (the forward inside
FisherPenalty.collecting, the loss term added). Both are built once; they alternate for `rounds` rounds of `steps`
steps (after one warm-up step each) and the medians are compared; a few seconds in all. Method and results:
docs/benchmarks.md, section "Heal: the Fisher penalty's cost, `bench.ewc_bench`".
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from bench.heal_bench import print_overhead, random_fisher, step_parser
from heal.config import HealConfig
from heal.ewc import FisherPenalty
from heal.protection import plan_ewc

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build(fisher: dict[str, torch.Tensor] | None, targets: list[str]):
    """(model, optimizer, penalty): LoRA r=16 on `targets`, penalised with `fisher` (by weight name) if given."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SHAPE)), LoraConfig(r=16, lora_alpha=32,
                                                                              target_modules=targets))
    penalty = None
    if fisher is not None:
        heal = HealConfig(stack="-", datasets=(), fisher="-", protection="ewc", ewc_lambda=1.0)
        plan = plan_ewc(fisher, targets, heal.ewc_lambda)
        penalty = FisherPenalty(plan, {name: tuple(fisher[f"{name}.weight"].shape) for name in plan}, heal)
        penalty.attach(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    return model.train(), optimizer, penalty


def step(model, optimizer, penalty, batch) -> None:
    if penalty is None:
        model(input_ids=batch, labels=batch).loss.backward()
    else:
        with penalty.collecting():
            loss = model(input_ids=batch, labels=batch).loss
        term, _ = penalty.loss_term(1, loss.device)
        (loss + term).backward()
    optimizer.step()
    optimizer.zero_grad()


def seconds_per_step(model, optimizer, penalty, batch, steps: int) -> float:
    step(model, optimizer, penalty, batch)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, penalty, batch)
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    args = step_parser("python -m bench.ewc_bench", __doc__, steps=4, length=128, batch_size=2).parse_args(argv)
    targets = [f"model.layers.{layer}.{kind}" for layer in range(SHAPE["num_hidden_layers"]) for kind in KINDS]
    generator = torch.Generator().manual_seed(0)
    fisher = random_fisher(SHAPE, targets, generator)
    batch = torch.randint(0, SHAPE["vocab_size"], (args.batch_size, args.length), generator=generator)
    variants = {"plain LoRA": build(None, targets), "penalised LoRA": build(fisher, targets)}
    times = {label: [] for label in variants}
    for _ in range(args.rounds):
        for label, (model, optimizer, penalty) in variants.items():
            times[label].append(seconds_per_step(model, optimizer, penalty, batch, args.steps))
    print_overhead(times, len(targets), args.batch_size * args.length, digits=4)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
