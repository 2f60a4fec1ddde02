"""Planning without tensor data, and what breaks when the stacker's Gemma-4 knowledge is switched off."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import Gemma4Config

import stack.plan as plan_module
from core.checkpoint import open_source
from stack.architectures import architecture_for
from stack.plan import PlanError, build_plan, check_against_transformers
from stack.recipe import load_recipe

from .checkpoints import assert_loads_clean, load_tensors, write_header_only_checkpoint
from .conftest import SEED_RECIPE, run_stack, write_recipe

# google/gemma-4-E4B-it's text config (DEVELOPERS.md), with default-size vision and audio towers.
E4B_TEXT = dict(
    hidden_size=2560, num_hidden_layers=42, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, global_head_dim=512, vocab_size=262144, vocab_size_per_layer_input=262144,
    hidden_size_per_layer_input=256, num_kv_shared_layers=18, tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def full_size_e4b_headers(tmp_path_factory):
    """A full-size E4B checkpoint holding headers only: 16 GB of tensors described, 0 bytes of data."""
    config = Gemma4Config(text_config=E4B_TEXT, vision_config={}, audio_config={})
    return write_header_only_checkpoint(tmp_path_factory.mktemp("e4b-headers"), config)


def seed_plan(source_dir):
    return build_plan(load_recipe(SEED_RECIPE, str(source_dir)), open_source(str(source_dir)))


def test_full_size_e6b_plan_from_headers_alone(full_size_e4b_headers):
    plan = seed_plan(full_size_e4b_headers)
    shapes = {t.name: t.shape for t in plan.tensors}
    assert shapes["model.language_model.embed_tokens_per_layer.weight"] == (262144, 66 * 256)
    assert shapes["model.language_model.per_layer_model_projection.weight"] == (66 * 256, 2560)
    # Full-attention slots keep head_dim 512 (q: 8 heads x 512), sliding ones 256.
    assert shapes["model.language_model.layers.19.self_attn.q_proj.weight"] == (8 * 512, 2560)  # source L11, full
    assert shapes["model.language_model.layers.18.self_attn.q_proj.weight"] == (8 * 256, 2560)  # source L10, sliding
    assert shapes["model.language_model.layers.32.self_attn.k_proj.weight"] == (2 * 256, 2560)  # grafted from L22
    assert plan.num_kv_shared_layers == 26
    assert plan.total_bytes == sum(t.nbytes for shard in plan.shards for t in shard)
    # Shards stay under 5 GB, except that a bigger tensor (the 8.9 GB PLE table) gets a shard of its own.
    assert all(sum(t.nbytes for t in shard) <= 5 * 10**9 or len(shard) == 1 for shard in plan.shards)
    assert [len(shard) for shard in plan.shards if sum(t.nbytes for t in shard) > 5 * 10**9] == [1]


def test_dry_run_prints_the_plan_and_writes_nothing(full_size_e4b_headers, tmp_path, capsys):
    out = tmp_path / "e6b"
    assert run_stack(SEED_RECIPE, full_size_e4b_headers, out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "-> 66 slots, 26 KV-shared" in printed
    assert "seams: slot 18 (L17 -> L10), slot 34 (L25 -> L18), slot 50 (L33 -> L26)" in printed
    assert "KV grafts: slot 32 (L24) <- k/v of L22, slot 33 (L25) <- k/v of L22" in printed
    # The card's breakdown: PLE table 4.43B (37%), token embeddings 0.67B (6%).
    assert re.search(r"PLE table\s+4\.429B\s+37\.4%", printed)
    assert re.search(r"token embeddings\s+671\.089M\s+5\.7%", printed)
    assert re.search(r"parameters: 11\.830B", printed)
    assert "output: 23.660 GB in 5 shard(s)" in printed
    assert not out.exists()


def test_real_run_on_missing_tensor_data_fails_before_writing(full_size_e4b_headers, tmp_path, caplog):
    out = tmp_path / "e6b"
    assert run_stack(SEED_RECIPE, full_size_e4b_headers, out) == 2
    assert "is truncated: tensor" in caplog.text and "Re-download" in caplog.text
    assert list(tmp_path.iterdir()) == []


# ---- the stacker's Gemma-4 knowledge, switched off one piece at a time -----------------------------------


def _with_architecture(monkeypatch, **changes):
    arch = dataclasses.replace(architecture_for("gemma4", "tiny"), **changes)
    monkeypatch.setattr(plan_module, "architecture_for", lambda *_: arch)


def test_without_ple_resequencing_the_stack_does_not_load(tiny_e4b, monkeypatch):
    """A generic passthrough merger leaves the PLE tensors at 42 blocks: transformers expects 66."""
    _with_architecture(monkeypatch, layer_block_tensors=())
    message = r"mismatched model\.language_model\.embed_tokens_per_layer\.weight: plan \[512, 336\]"
    with pytest.raises(PlanError, match=message):
        seed_plan(tiny_e4b)


def test_without_kv_sharing_rules_the_stack_does_not_load(tiny_e4b, monkeypatch):
    """Copying layers blindly leaves slots 32-33 (consumer sources, now producers) without k/v weights."""
    _with_architecture(monkeypatch, kv_sharing=None)
    with pytest.raises(PlanError, match=r"missing model\.language_model\.layers\.32\.self_attn\.k_norm\.weight"):
        seed_plan(tiny_e4b)


def test_rebuilding_the_5_to_1_rhythm_by_slot_index_does_not_load(tiny_e4b):
    """The card says 'rebuild the 5:1 rhythm'; but full and sliding layers have different q/k/v/o shapes."""
    plan = seed_plan(tiny_e4b)
    rhythm = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(66)]
    config = dict(plan.config, text_config=dict(
        plan.config["text_config"], layer_types=rhythm,
        per_layer_config={str(i): {"head_dim": 32} for i, t in enumerate(rhythm) if t == "full_attention"}))
    slots = tuple(dataclasses.replace(slot, attention_type=rhythm[slot.index]) for slot in plan.slots)
    with pytest.raises(PlanError, match=r"mismatched model\.language_model\.layers\.\d+\.self_attn\.q_proj\.weight"):
        check_against_transformers(dataclasses.replace(plan, config=config, slots=slots))


# ---- where grafted K/V comes from ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def e4b_with_dead_kv(tiny_e4b, tmp_path_factory):
    """The tiny E4B as an original (non-transformers) checkpoint might be: KV consumers still hold
    k_proj/v_proj/k_norm that transformers never uses."""
    directory = tmp_path_factory.mktemp("e4b-dead-kv")
    tensors = load_tensors(tiny_e4b)
    generator = torch.Generator().manual_seed(1)
    for layer in range(24, 42):
        head_dim = 32 if layer % 6 == 5 else 16
        shapes = (("k_proj.weight", (2 * head_dim, 64)), ("v_proj.weight", (2 * head_dim, 64)),
                  ("k_norm.weight", (head_dim,)))
        for suffix, shape in shapes:
            values = torch.randn(shape, generator=generator).to(torch.bfloat16)
            tensors[f"model.language_model.layers.{layer}.self_attn.{suffix}"] = values
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).write_bytes((tiny_e4b / name).read_bytes())
    return directory


@pytest.mark.parametrize("graft_source, donor", [("producer", 22), ("checkpoint", 24)])
def test_graft_source_option(e4b_with_dead_kv, tmp_path, graft_source, donor):
    out = tmp_path / "e6b"
    recipe = write_recipe(tmp_path / "r.yaml", [(0, 18), (10, 26), (18, 34), (26, 42)], kv_graft_source=graft_source)
    assert run_stack(recipe, e4b_with_dead_kv, out) == 0
    source, stacked = load_tensors(e4b_with_dead_kv), load_tensors(out)
    key = "model.language_model.layers.{}.self_attn.k_proj.weight"
    assert torch.equal(stacked[key.format(32)], source[key.format(donor)])
    assert key.format(40) not in stacked  # dead weights of reuse slots are dropped, not copied
    assert_loads_clean(out)


def test_checkpoint_graft_source_needs_dead_weights(tiny_e4b, tmp_path, caplog):
    recipe = write_recipe(tmp_path / "r.yaml", [(0, 18), (10, 26), (18, 34), (26, 42)], kv_graft_source="checkpoint")
    assert run_stack(recipe, tiny_e4b, tmp_path / "e6b") == 2
    assert "slot 32 needs K/V weights for source layer 24" in caplog.text
    assert "no model.language_model.layers.24.self_attn.k_proj.* tensor. Use kv_graft_source: producer" in caplog.text


def test_a_plan_whose_kv_roles_disagree_with_transformers_is_rejected(tiny_e4b):
    """Keys and shapes can agree while roles differ: slot 39 as 'own' instead of the full-attention producer."""
    plan = seed_plan(tiny_e4b)
    slots = tuple(dataclasses.replace(s, kv_role="own") if s.index == 39 else s for s in plan.slots)
    with pytest.raises(PlanError, match="transformers reads kv_sharing_modes"):
        check_against_transformers(dataclasses.replace(plan, slots=slots))


def test_recipe_dtype_must_match_the_checkpoint(tiny_llama, tmp_path, caplog):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: passthrough\ndtype: float16\n"
                      "slices:\n  - sources: [{model: m, layer_range: [0, 6]}]\n")
    assert run_stack(recipe, tiny_llama, tmp_path / "out") == 2
    assert "recipe dtype 'float16' but model" in caplog.text and "stores its weights as BF16" in caplog.text
