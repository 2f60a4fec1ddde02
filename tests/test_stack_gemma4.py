"""The seed topology on a tiny 42-layer E4B-shaped Gemma-4: every tensor, config field and file.

Expected values come from the model card's mapping (SEED_SOURCE_LAYERS), written out in the test,
not from the stacker's plan.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

from stack import __version__
from stack.manifest import load_manifest

from .checkpoints import assert_loads_clean, load_config, load_tensors, logits
from .conftest import SEED_SOURCE_LAYERS, run_stack, write_recipe

LAYERS = "model.language_model.layers."
PLE_TABLE = "model.language_model.embed_tokens_per_layer.weight"
PLE_PROJECTION = "model.language_model.per_layer_model_projection.weight"
KV_SUFFIXES = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")
PLE_BLOCK = 8  # TINY_E4B_TEXT["hidden_size_per_layer_input"]

# Source E4B: layers 24..41 are KV consumers; 22 (sliding) and 23 (full) are the producers.
GRAFTED_SLOTS = {32: 22, 33: 22}  # slots whose sources (24, 25) were consumers, now before the shared tail
SHARED_TAIL = range(40, 66)  # slots 40..65 all come from consumer layers 24..41: 26 KV-shared


@pytest.fixture(scope="module")
def source(tiny_e4b):
    return load_tensors(tiny_e4b)


@pytest.fixture(scope="module")
def stacked(tiny_e6b):
    return load_tensors(tiny_e6b)


def layer_tensors(tensors: dict, layer: int) -> dict[str, torch.Tensor]:
    prefix = f"{LAYERS}{layer}."
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def test_fixture_layers_are_distinct(source):
    """Guards the tests below: equality with the mapped layer is meaningless if all layers were equal."""
    for suffix in ("layer_scalar", "input_layernorm.weight", "mlp.down_proj.weight", "self_attn.q_norm.weight"):
        values = [layer_tensors(source, j)[suffix] for j in range(42)]
        assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:] if a.shape == b.shape)


def test_slots_are_byte_copies_of_their_source_layers(source, stacked):
    for slot, layer in enumerate(SEED_SOURCE_LAYERS):
        got, want = layer_tensors(stacked, slot), layer_tensors(source, layer)
        own = {s: t for s, t in want.items() if s not in KV_SUFFIXES}
        assert {s: t for s, t in got.items() if s not in KV_SUFFIXES}.keys() == own.keys(), f"slot {slot}"
        for suffix, tensor in own.items():
            assert got[suffix].dtype == tensor.dtype == torch.bfloat16 or suffix == "layer_scalar"
            assert torch.equal(got[suffix], tensor), f"slot {slot} {suffix} != layer {layer}"
        assert torch.equal(got["layer_scalar"], want["layer_scalar"])


def test_kv_tensors_own_grafted_and_dropped(source, stacked):
    for slot, layer in enumerate(SEED_SOURCE_LAYERS):
        got = layer_tensors(stacked, slot)
        if slot in SHARED_TAIL:
            assert not any(s in got for s in KV_SUFFIXES), f"reuse slot {slot} must hold no K/V weights"
            continue
        donor = GRAFTED_SLOTS.get(slot, layer)
        for suffix in KV_SUFFIXES:
            assert torch.equal(got[suffix], layer_tensors(source, donor)[suffix]), f"slot {slot} {suffix} != L{donor}"


def test_ple_table_and_projection_are_resequenced(source, stacked):
    table, projection = source[PLE_TABLE], source[PLE_PROJECTION]
    assert table.shape == (512, 42 * PLE_BLOCK) and stacked[PLE_TABLE].shape == (512, 66 * PLE_BLOCK)
    assert stacked[PLE_PROJECTION].shape == (66 * PLE_BLOCK, 64)
    for slot, layer in enumerate(SEED_SOURCE_LAYERS):
        out_cols = slice(slot * PLE_BLOCK, (slot + 1) * PLE_BLOCK)
        src_cols = slice(layer * PLE_BLOCK, (layer + 1) * PLE_BLOCK)
        assert torch.equal(stacked[PLE_TABLE][:, out_cols], table[:, src_cols]), f"PLE table block of slot {slot}"
        message = f"PLE projection block of slot {slot}"
        assert torch.equal(stacked[PLE_PROJECTION][out_cols], projection[src_cols]), message


def test_everything_else_is_copied_verbatim(source, stacked):
    others = {n for n in source if not n.startswith(LAYERS) and n not in (PLE_TABLE, PLE_PROJECTION)}
    assert others == {n for n in stacked if not n.startswith(LAYERS) and n not in (PLE_TABLE, PLE_PROJECTION)}
    assert any(n.startswith("model.vision_tower.") for n in others)
    assert any(n.startswith("model.audio_tower.") for n in others)
    assert "model.language_model.per_layer_projection_norm.weight" in others
    for name in others:
        assert torch.equal(stacked[name], source[name]), name


def test_config_is_resequenced(tiny_e4b, tiny_e6b):
    src, out = load_config(tiny_e4b), load_config(tiny_e6b)
    src_text, out_text = src["text_config"], out["text_config"]
    assert out_text["num_hidden_layers"] == 66
    assert out_text["num_kv_shared_layers"] == 26
    assert out_text["layer_types"] == [src_text["layer_types"][j] for j in SEED_SOURCE_LAYERS]
    assert out_text["layer_types"][-1] == "full_attention"
    full_source_layers = {int(k) for k in src_text["per_layer_config"]}
    assert full_source_layers == {5, 11, 17, 23, 29, 35, 41}
    full_slots = {i for i, j in enumerate(SEED_SOURCE_LAYERS) if j in full_source_layers}
    assert {int(k) for k in out_text["per_layer_config"]} == full_slots
    for key, value in out_text["per_layer_config"].items():
        assert value == src_text["per_layer_config"][f"{SEED_SOURCE_LAYERS[int(key)]:02d}"]
    changed = {"num_hidden_layers", "num_kv_shared_layers", "layer_types", "per_layer_config"}
    unchanged = {k: v for k, v in src_text.items() if k not in changed}
    assert {k: v for k, v in out_text.items() if k not in changed} == unchanged
    assert {k: v for k, v in out.items() if k != "text_config"} == {k: v for k, v in src.items() if k != "text_config"}


def test_transformers_sees_the_planned_structure(tiny_e6b):
    model = assert_loads_clean(tiny_e6b, Gemma4ForConditionalGeneration)
    text = model.config.text_config
    modes = text.kv_sharing_modes
    assert [i for i, m in enumerate(modes) if m == "store"] == [38, 39]
    assert [i for i, m in enumerate(modes) if m == "reuse"] == list(SHARED_TAIL)
    head_dims = [layer.self_attn.head_dim for layer in model.model.language_model.layers]
    assert head_dims == [32 if t == "full_attention" else 16 for t in text.layer_types]


def test_loads_clean_with_automodel_and_generates(tiny_e6b):
    model = assert_loads_clean(tiny_e6b)
    prompt = torch.tensor([[2, 17, 33, 48, 5]])
    first = model.generate(prompt, max_new_tokens=6, do_sample=False)
    again = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert first.shape == (1, 11) and torch.equal(first, again)


def test_tokenizer_chat_template_and_generation_files_are_copied(tiny_e4b, tiny_e6b):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tiny_e6b / name).read_bytes() == (tiny_e4b / name).read_bytes(), name
    messages = [{"role": "user", "content": "w1 w2"}]
    render = [AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tokenize=False)
              for d in (tiny_e4b, tiny_e6b)]
    assert render[0] == render[1] and "<start_of_turn>user" in render[1]


def test_manifest(tiny_e4b, tiny_e6b):
    manifest = load_manifest(tiny_e6b)
    assert manifest.stacker_version == __version__
    assert manifest.source.num_hidden_layers == 42 and manifest.num_hidden_layers == 66
    shard_sha256 = hashlib.sha256((tiny_e4b / "model.safetensors").read_bytes()).hexdigest()
    assert manifest.source.shard_sha256 == {"model.safetensors": shard_sha256}
    assert [s.source_layer for s in manifest.slots] == SEED_SOURCE_LAYERS
    assert [s.slot for s in manifest.seams] == [18, 34, 50]
    assert [(s.from_layer, s.to_layer) for s in manifest.seams] == [(17, 10), (25, 18), (33, 26)]
    assert [s.index for s in manifest.slots if s.on_seam] == [17, 18, 33, 34, 49, 50]
    roles = {s.index: (s.kv_role, s.kv_graft_from) for s in manifest.slots}
    assert roles[32] == roles[33] == ("grafted", 22)
    assert roles[38] == roles[39] == ("producer", None)
    assert all(roles[i] == ("reuse", None) for i in SHARED_TAIL)
    assert all(roles[i] == ("own", None) for i in range(32))
    assert manifest.recipe["slices"][1]["sources"][0]["layer_range"] == [10, 26]


def test_identity_topology_reproduces_source_logits_bit_exactly(tiny_e4b, tmp_path):
    out = tmp_path / "identity"
    assert run_stack(write_recipe(tmp_path / "identity.yaml", [(0, 42)]), tiny_e4b, out) == 0
    source_model, _ = Gemma4ForConditionalGeneration.from_pretrained(tiny_e4b, output_loading_info=True)
    stacked_model = assert_loads_clean(out, Gemma4ForConditionalGeneration)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(stacked_model, ids), logits(source_model.eval(), ids))


def test_logits_comparison_detects_a_changed_stack(tiny_e4b, tmp_path):
    """The bit-exact check above can fail: repeating one layer changes the logits."""
    out = tmp_path / "repeat"
    assert run_stack(write_recipe(tmp_path / "repeat.yaml", [(0, 24), (23, 42)]), tiny_e4b, out) == 0
    source_model, _ = Gemma4ForConditionalGeneration.from_pretrained(tiny_e4b, output_loading_info=True)
    stacked_model = assert_loads_clean(out, Gemma4ForConditionalGeneration)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(logits(stacked_model, ids), logits(source_model.eval(), ids))


def test_a_config_with_global_head_dim_instead_of_per_layer_config(tiny_e4b, tmp_path):
    """Configs written before per_layer_config existed give global_head_dim; transformers derives the
    per-layer head_dim from layer_types, so the re-sequenced layer_types must carry it."""
    import shutil

    source = tmp_path / "e4b-global-head-dim"
    shutil.copytree(tiny_e4b, source)
    config = load_config(source)
    del config["text_config"]["per_layer_config"]
    config["text_config"]["global_head_dim"] = 32
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "e6b"
    assert run_stack(write_recipe(tmp_path / "r.yaml", [(0, 18), (10, 26), (18, 34), (26, 42)]), source, out) == 0
    text = load_config(out)["text_config"]
    assert "per_layer_config" not in text and text["global_head_dim"] == 32
    model = assert_loads_clean(out, Gemma4ForConditionalGeneration)
    assert [layer.self_attn.head_dim for layer in model.model.language_model.layers] == [
        32 if j % 6 == 5 else 16 for j in SEED_SOURCE_LAYERS]
