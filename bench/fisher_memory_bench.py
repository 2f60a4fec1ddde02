"""Peak memory of one Fisher batch with E4B's 262,144-token vocabulary: full-logit log_softmax against
fisher/'s chunked LM head, side by side, each in its own process (peak RSS from wait4).

    .venv/bin/python -m bench.fisher_memory_bench [--length 2048] [--batch-size 1] [--chunked-batch-size 4]

Variants baseline, full-logits (the former path, whose formula lives only here now), chunked and chunked-bN, on
a tiny Gemma-4 with E4B's structure and vocabulary. Method and results: docs/benchmarks.md, section "Fisher
memory: the chunked LM head".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.measure import markdown_table, run_child
from core.cli import setup_logging

GEMMA_VOCAB = 262_144
MODEL_SHAPE = dict(num_hidden_layers=12, num_kv_shared_layers=4, vocab_size=GEMMA_VOCAB,
                   vocab_size_per_layer_input=GEMMA_VOCAB, final_logit_softcapping=30.0, max_position_embeddings=4096)


def build(length: int, batch_size: int):
    """The model (frozen, hooks as in `python -m fisher`) and `batch_size` random examples of `length` loss tokens."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from fisher.config import config_from_dict
    from fisher.data import Example
    from fisher.run import prepare_for_fisher
    from stack.tiny import TINY_AUDIO, TINY_E4B_TEXT, TINY_VISION

    torch.manual_seed(0)
    config = Gemma4Config(text_config={**TINY_E4B_TEXT, **MODEL_SHAPE}, vision_config=TINY_VISION,
                          audio_config=TINY_AUDIO)
    model = Gemma4ForConditionalGeneration(config)
    fisher_config = config_from_dict({"model": "bench", "datasets": [{"path": "bench"}], "batch_size": batch_size,
                                      "dtype": "float32", "max_length": length})
    prepare_for_fisher(model, fisher_config)
    ids = torch.randint(0, GEMMA_VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(0)).tolist()
    return model, [Example(i, row, row) for i, row in enumerate(ids)], fisher_config


def full_logits_batch(model, accumulator, examples) -> None:
    """The former Fisher batch: log_softmax over the full [B, T, V] fp32 logits, then one backward."""
    from fisher.run import pad_examples

    input_ids, attention_mask, labels = pad_examples(examples, 0, torch.device("cpu"))
    with accumulator.hooked():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        targets = labels[:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        log_likelihood = torch.where(targets != -100, picked, 0.0).sum(dim=1)
        with accumulator.backward_pass(include=log_likelihood.isfinite()):
            log_likelihood.sum().backward()


def child(variant: str, length: int, batch_size: int) -> None:
    from fisher.estimator import Accumulator, decoder_linears
    from fisher.run import run_fisher

    model, examples, config = build(length, batch_size)
    accumulator = Accumulator(decoder_linears(model))
    started = time.perf_counter()
    if variant == "full-logits":
        full_logits_batch(model, accumulator, examples)
    elif variant == "chunked":
        run_fisher(model, accumulator, examples, config, pad_token_id=0)
    print(json.dumps({"fisher_batch_s": time.perf_counter() - started}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fisher_memory_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the side-by-side comparison")
    parser.add_argument("--chunked-batch-size", type=int, default=4,
                        help="one more chunked run at this batch (0: none)")
    parser.add_argument("--child", choices=["baseline", "full-logits", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.length, args.batch_size)
        return 0
    setup_logging()
    runs = [("baseline", args.batch_size), ("full-logits", args.batch_size), ("chunked", args.batch_size)]
    if args.chunked_batch_size:
        runs.append(("chunked", args.chunked_batch_size))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fisher-memory-bench-") as scratch:
        for variant, batch in runs:
            log = Path(scratch) / f"{variant}-b{batch}.log"
            command = [sys.executable, "-m", "bench.fisher_memory_bench", "--child", variant,
                       "--length", str(args.length), "--batch-size", str(batch)]
            result = run_child(command, log)
            line = next(line for line in log.read_text().splitlines() if line.startswith('{"fisher_batch_s"'))
            seconds = json.loads(line)["fisher_batch_s"]
            rows.append({"variant": variant, "batch": batch, "peak_rss_gb": result.peak_rss_bytes / 1e9,
                         "fisher_batch_s": seconds})
    summary = {"length": args.length, "vocab": GEMMA_VOCAB, "threads": torch.get_num_threads(), "runs": rows}
    print(json.dumps(summary, indent=2))
    print()
    print(markdown_table(["variant", "batch", "tokens", "peak RSS (GB)", "Fisher batch (s)"],
                         [[row["variant"], str(row["batch"]), str(row["batch"] * args.length),
                           f"{row['peak_rss_gb']:.2f}", f"{row['fisher_batch_s']:.1f}"] for row in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
