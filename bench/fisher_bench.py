"""Fisher throughput against a plain forward+backward over the same tokens, side by side in one run.

    .venv/bin/python -m bench.fisher_bench [--sequences 16] [--length 256] [--batch-size 4] [--dtype float32]

"plain" is one training step's work per batch, "fisher" is fisher.run.run_fisher on the same batches, both on a
random Llama with SmolLM2-135M's shape. Method and results: docs/benchmarks.md, section "Fisher".
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fisher.config import config_from_dict
from fisher.data import Example
from fisher.estimator import Accumulator, decoder_linears
from fisher.run import pad_examples, prepare_for_fisher, run_fisher

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def make_examples(count: int, length: int, vocab: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (count, length), generator=generator).tolist()
    return [Example(i, row, row) for i, row in enumerate(ids)]  # text format: every token is a loss token


def plain_step_seconds(model, examples, batch_size) -> float:
    model.train()
    model.requires_grad_(True)
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    _plain_step(model, batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        _plain_step(model, batch)
    return time.perf_counter() - started


def _plain_step(model, batch) -> None:
    input_ids, attention_mask, labels = pad_examples(batch, 0, torch.device("cpu"))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")
    loss.backward()
    model.zero_grad(set_to_none=True)


def fisher_seconds(model, examples, batch_size, examples_per_chunk) -> float:
    config = config_from_dict({"model": "bench", "datasets": [{"path": "bench"}], "batch_size": batch_size,
                               "examples_per_chunk": examples_per_chunk})
    prepare_for_fisher(model, config)
    accumulator = Accumulator(decoder_linears(model), examples_per_chunk=examples_per_chunk)
    run_fisher(model, accumulator, examples[:batch_size], config, pad_token_id=0)  # warm-up
    started = time.perf_counter()
    run_fisher(model, accumulator, examples, config, pad_token_id=0)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fisher_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--examples-per-chunk", type=int, default=1,
                        help="per-example gradients held at once per module")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(getattr(torch, args.dtype))
    examples = make_examples(args.sequences, args.length, SMOLLM2_SHAPE["vocab_size"])
    tokens = args.sequences * args.length
    plain = plain_step_seconds(model, examples, args.batch_size)
    fisher = fisher_seconds(model, examples, args.batch_size, args.examples_per_chunk)
    result = {
        "threads": torch.get_num_threads(), "tokens": tokens, "batch_size": args.batch_size, "dtype": args.dtype,
        "examples_per_chunk": args.examples_per_chunk,
        "plain_tok_per_s": tokens / plain, "fisher_tok_per_s": tokens / fisher, "fisher_over_plain": plain / fisher,
    }
    print(json.dumps(result, indent=2))
    print(f"\n| tokens | batch | examples per chunk | dtype | plain fwd+bwd tok/s | Fisher tok/s | Fisher / plain |\n"
          f"|---:|---:|---:|---|---:|---:|---:|\n"
          f"| {tokens} | {args.batch_size} | {args.examples_per_chunk} | {args.dtype} | "
          f"{tokens / plain:.0f} | {tokens / fisher:.0f} | {plain / fisher:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
