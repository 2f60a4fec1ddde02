"""Fisher-subspace protection: selection, mapping through stack.json, and the exact guarantee
after training with weight decay and merge_and_unload (with negative controls)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from heal.config import HealConfig, HealConfigError
from heal.protection import (
    ModuleProtection,
    ProtectionError,
    attach,
    bake,
    check_fisher_matches,
    check_fisher_provenance,
    load_protection,
    plan_difference,
    plan_protection,
    protected_coordinates,
    save_protection,
    slot_fisher,
)
from stack.manifest import load_manifest

from .checkpoints import load_tensors
from .conftest import SEED_SOURCE_LAYERS

LAYERS = "model.language_model.layers."


def test_protected_coordinates_are_the_fewest_covering_the_share():
    marginal = torch.tensor([1.0, 10.0, 3.0, 6.0])  # total 20
    assert protected_coordinates(marginal, 0.5, 0.9)[0].tolist() == [1]  # 10/20 = 0.5 exactly
    chosen, share = protected_coordinates(marginal, 0.75, 0.9)
    assert chosen.tolist() == [1, 3] and share == pytest.approx(0.8)
    assert protected_coordinates(marginal, 0.99, 0.5)[0].tolist() == [1, 3]  # capped at floor(0.5 * 4)
    assert protected_coordinates(torch.zeros(4), 0.5, 0.5)[0].numel() == 0


@pytest.mark.parametrize("field, value",
                         [("mass_share", 0.0), ("mass_share", 1.0), ("max_fraction", 1.5), ("max_fraction", -0.1)])
def test_shares_outside_zero_one_are_rejected(field, value):
    with pytest.raises(HealConfigError, match=f"protection {field} must be in \\(0, 1\\), got {value}"):
        heal_config(**{field: value})


def heal_config(**protection) -> HealConfig:
    """A HealConfig carrying only protection settings (no stack or data is read)."""
    return HealConfig(stack="s", datasets=(), protect=False, **protection)


@pytest.fixture(scope="module")
def manifest(tiny_e6b):
    return load_manifest(tiny_e6b)


def test_fisher_maps_to_every_slot_holding_the_source_layer(source_fisher, manifest):
    mapped = slot_fisher(source_fisher, manifest)
    for slot, layer in enumerate(SEED_SOURCE_LAYERS):
        for kind in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "per_layer_input_gate.weight"):
            assert torch.equal(mapped[f"{LAYERS}{slot}.{kind}"], source_fisher[f"{LAYERS}{layer}.{kind}"])
    # Slots 32-33 carry k/v grafted from L22: no source Fisher for them, so unprotected.
    assert f"{LAYERS}32.self_attn.k_proj.weight" not in mapped and f"{LAYERS}32.self_attn.q_proj.weight" in mapped
    assert f"{LAYERS}31.self_attn.k_proj.weight" in mapped


def test_first_copy_only(source_fisher, manifest):
    mapped = slot_fisher(source_fisher, manifest, first_copy_only=True)
    # Both are L10.
    assert f"{LAYERS}10.mlp.up_proj.weight" in mapped and f"{LAYERS}18.mlp.up_proj.weight" not in mapped


def test_fisher_from_another_model_names_the_first_mismatch(source_fisher, tiny_e4b):
    shapes = {n: tuple(t.shape) for n, t in load_tensors(tiny_e4b).items()}
    check_fisher_matches(source_fisher, shapes, "tiny")
    wrong = dict(source_fisher, **{f"{LAYERS}0.mlp.down_proj.weight": torch.ones(3, 3)})
    message = rf"{LAYERS}0\.mlp\.down_proj\.weight' has shape \[3, 3\] but 'tiny' has \[64, 128\]"
    with pytest.raises(ProtectionError, match=message):
        check_fisher_matches(wrong, shapes, "tiny")
    with pytest.raises(ProtectionError, match="is not a weight of the stack's source"):
        check_fisher_matches({"model.layers.0.mlp.up_proj.weight": torch.ones(1)}, shapes, "tiny")


# ---- the guarantee -----------------------------------------------------------------------------------------------

SEAM_SLOTS = (17, 18)
TARGETS = [f"{LAYERS}{slot}.{kind}" for slot in SEAM_SLOTS
           for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                        "per_layer_input_gate")]


def heal_steps(stack_dir, plan, protect: bool, bake_before_merge: bool = True):
    """A few AdamW steps with weight decay on seam LoRA, then merge. Returns (base weights, merged weights)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stack_dir, dtype=torch.float32)
    base = {name: model.get_submodule(name).weight.detach().clone() for name in TARGETS}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    if protect:
        attach(peft_model, plan)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.5)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if protect and bake_before_merge:
        bake(peft_model, plan)
    merged = peft_model.merge_and_unload()
    return base, {name: merged.get_submodule(name).weight.detach() for name in TARGETS}


@pytest.fixture(scope="module")
def plan(source_fisher, manifest):
    return plan_protection(slot_fisher(source_fisher, manifest), TARGETS, mass_share=0.5, max_fraction=0.25)


def test_protected_directions_are_unchanged_after_training_and_merge(tiny_e6b, plan):
    base, merged = heal_steps(tiny_e6b, plan, protect=True)
    for name, protection in plan.items():
        assert len(protection.inputs) and len(protection.outputs), name
        inputs, outputs = protection.inputs, protection.outputs
        assert torch.equal(merged[name][:, inputs], base[name][:, inputs]), f"{name}: ΔW·e_k != 0"
        assert torch.equal(merged[name][outputs, :], base[name][outputs, :]), f"{name}: e_oᵀ·ΔW != 0"
        free = torch.ones_like(base[name], dtype=torch.bool)
        free[:, protection.inputs] = False
        free[protection.outputs, :] = False
        assert not torch.equal(merged[name][free], base[name][free]), f"{name}: the adapter did not train"


def test_without_protection_the_same_directions_change(tiny_e6b, plan):
    base, merged = heal_steps(tiny_e6b, plan, protect=False)
    changed = [name for name, p in plan.items() if not torch.equal(merged[name][:, p.inputs], base[name][:, p.inputs])]
    assert len(changed) == len(plan)


def test_without_bake_weight_decay_leaks_into_the_merge(tiny_e6b, plan):
    """The forward masks keep the function exact, but A[:, k] still holds its (decayed) init: merging
    those weights unbaked would move the protected columns. bake() is what makes the merge exact."""
    base, merged = heal_steps(tiny_e6b, plan, protect=True, bake_before_merge=False)
    assert any(not torch.equal(merged[n][:, p.inputs], base[n][:, p.inputs]) for n, p in plan.items())


def test_attached_masks_zero_the_adapter_on_protected_inputs(tiny_e6b, plan):
    model = AutoModelForCausalLM.from_pretrained(tiny_e6b, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    attach(peft_model, plan)
    name = TARGETS[2]
    layer = peft_model.base_model.model.get_submodule(name)
    protected_input = torch.zeros(layer.in_features)
    protected_input[plan[name].inputs[0]] = 1.0
    assert torch.equal(layer(protected_input[None]), layer.base_layer(protected_input[None]))


def test_protection_file_round_trips(tmp_path, plan):
    shapes = {name: (64, 64) for name in plan}
    save_protection(tmp_path / "protection.safetensors", plan, shapes, heal_config(mass_share=0.5, max_fraction=0.25))
    loaded = load_protection(tmp_path / "protection.safetensors")
    assert loaded.keys() == plan.keys()
    for name in plan:
        assert torch.equal(loaded[name].inputs, plan[name].inputs)
        assert torch.equal(loaded[name].outputs, plan[name].outputs)
        assert loaded[name].input_mass_covered == pytest.approx(plan[name].input_mass_covered)


def test_protecting_an_untargeted_module_is_an_error(tiny_e6b, plan):
    model = AutoModelForCausalLM.from_pretrained(tiny_e6b, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS[:1]))
    with pytest.raises(ProtectionError, match="have no LoRA layer"):
        attach(peft_model, plan)


# ---- provenance and plans ------------------------------------------------------------------------------------------


def test_a_fisher_of_another_source_is_refused_unless_allowed(manifest, caplog):
    fisher_metadata = {"model": "google/gemma-4-E4B", "model_shard_sha256": dict(manifest.source.shard_sha256)}
    check_fisher_provenance("f.safetensors", fisher_metadata, "s/stack.json", manifest)  # the same shards: accepted
    (shard,) = fisher_metadata["model_shard_sha256"]
    fisher_metadata["model_shard_sha256"][shard] = "0" * 64
    expected = (rf"f\.safetensors was computed on 'google/gemma-4-E4B', but s/stack\.json .*\(shard {shard}: "
                rf"the Fisher's sha256 0000000000000000.*fisher_allow_other_source: true")
    with pytest.raises(ProtectionError, match=expected):
        check_fisher_provenance("f.safetensors", fisher_metadata, "s/stack.json", manifest)
    check_fisher_provenance("f.safetensors", fisher_metadata, "s/stack.json", manifest, allow_other_source=True)
    assert "protecting with it anyway (fisher_allow_other_source: true)" in caplog.text
    with pytest.raises(ProtectionError, match="the Fisher's sha256 absent"):
        check_fisher_provenance("f.safetensors", {"model": "x"}, "s/stack.json", manifest)


def test_plan_difference_names_the_first_differing_module(plan):
    assert plan_difference(plan, plan) is None
    first = sorted(plan)[0]
    moved = dict(plan, **{first: ModuleProtection(plan[first].inputs + 1, plan[first].outputs, 0.5, 0.5)})
    assert plan_difference(plan, moved) == f"the protected input coordinates of {first!r} differ"
    fewer = {name: p for name, p in plan.items() if name != first}
    assert f"e.g. {first!r} is in only one" in plan_difference(plan, fewer)
