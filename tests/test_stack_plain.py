"""Plain decoders go through the same code: Llama, Mistral, Qwen2 and Gemma-3 style."""

from __future__ import annotations

import json

import pytest
import torch

from core.checkpoint import open_source
from stack.manifest import load_manifest
from stack.tiny import save_tiny_decoder, save_tiny_gemma3
from stack.verify import verify_tensors

from .checkpoints import assert_loads_clean, load_config, load_tensors, logits
from .conftest import run_stack, write_recipe

OVERLAP = [(0, 4), (2, 6)]
OVERLAP_SOURCES = [0, 1, 2, 3, 2, 3, 4, 5]


def test_llama_overlap_stack_maps_every_tensor(tiny_llama, tmp_path):
    out = tmp_path / "llama8"
    assert run_stack(write_recipe(tmp_path / "r.yaml", OVERLAP), tiny_llama, out) == 0
    source, stacked = load_tensors(tiny_llama), load_tensors(out)
    for slot, layer in enumerate(OVERLAP_SOURCES):
        prefix, src_prefix = f"model.layers.{slot}.", f"model.layers.{layer}."
        want = {n[len(src_prefix):]: t for n, t in source.items() if n.startswith(src_prefix)}
        got = {n[len(prefix):]: t for n, t in stacked.items() if n.startswith(prefix)}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"slot {slot}"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(stacked[name], source[name])
    assert load_config(out)["num_hidden_layers"] == 8
    manifest = load_manifest(out)
    assert [s.slot for s in manifest.seams] == [4]
    assert {s.kv_role for s in manifest.slots} == {"own"}
    assert_loads_clean(out).generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)


def save_tiny(model_type, directory):
    if model_type == "gemma3":  # multimodal: text decoder under language_model.model., plus a vision tower
        return save_tiny_gemma3(directory, num_hidden_layers=4)
    return save_tiny_decoder(directory, model_type, num_hidden_layers=4)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma3_text", "gemma3"])
def test_identity_stack_reproduces_logits_bit_exactly(model_type, tmp_path):
    source = save_tiny(model_type, tmp_path / "source")
    out = tmp_path / "identity"
    assert run_stack(write_recipe(tmp_path / "r.yaml", [(0, 4)]), source, out) == 0
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    stacked_model = assert_loads_clean(out)
    source_model = assert_loads_clean(source)
    assert torch.equal(logits(stacked_model, ids), logits(source_model, ids))


def test_gemma3_multimodal_overlap_stack_verifies(tmp_path):
    source = save_tiny_gemma3(tmp_path / "source")
    out = tmp_path / "stack"
    assert run_stack(write_recipe(tmp_path / "r.yaml", OVERLAP), source, out) == 0
    assert load_config(out)["text_config"]["num_hidden_layers"] == 8
    assert verify_tensors(out, open_source(str(source))) == len(load_tensors(out))
    assert_loads_clean(out)


def test_per_layer_list_fields_are_resequenced(tmp_path):
    """Qwen2 and Gemma-3 write layer_types; a stack re-sequences them by source layer."""
    source = save_tiny_decoder(tmp_path / "source", "gemma3_text", num_hidden_layers=6)
    config = json.loads((source / "config.json").read_text())
    types = ["sliding_attention", "full_attention"] * 3
    (source / "config.json").write_text(json.dumps(dict(config, layer_types=types)))
    out = tmp_path / "stack"
    assert run_stack(write_recipe(tmp_path / "r.yaml", OVERLAP), source, out) == 0
    assert load_config(out)["layer_types"] == [types[j] for j in OVERLAP_SOURCES]
    assert_loads_clean(out)
