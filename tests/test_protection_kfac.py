"""`protection: kfac`: the LoRA update kept out of the source's leading K-FAC eigen-directions (ΔW U = 0,
Vᵀ ΔW = 0), and `protect_modules` for both constructions. Selection and mapping through stack.json, the
projections, the guarantee on the merged checkpoint read from disk after AdamW with weight decay (with negative
controls), every checkpoint baked by the trainer's save path, the audit file and card, resume, heal.plan, and the
errors raised before any model loads. The factors are random PSD moments (tests/fisher_support.random_factors)
with the tiny E4B's shard hashes; ZeRO-2/3 runs are in tests/test_heal_distributed.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fisher.factors import Eigenbasis, load_factors, save_factors
from fisher.file import METADATA_KEY
from heal.card import protection_report
from heal.config import HealConfig, HealConfigError, load_config
from heal.kfac import SubspaceProtection, leading_subspace
from heal.plan import build_heal_plan, format_plan
from heal.protection import (
    PROTECTION_FILE,
    ModuleProtection,
    ProtectionError,
    attach,
    bake,
    check_factor_layers,
    load_protection,
    plan_difference,
    plan_kfac,
    protected_modules,
    save_protection,
)
from heal.train import main
from stack.manifest import load_manifest

from .checkpoints import KFAC_RELATIVE_BOUND, assert_protection_holds, load_tensors, subspace_residuals
from .conftest import heal_recipe
from .fisher_support import rows_for, write_jsonl

LAYERS = "model.language_model.layers."
ADAPTER = "adapter_model.safetensors"


def kfac_config(**overrides) -> HealConfig:
    """A HealConfig carrying only protection settings (no stack or data is read)."""
    return HealConfig(stack="s", datasets=(), protect=False, protection="kfac", factors="f.safetensors",
                      **overrides)


# ---- selection -----------------------------------------------------------------------------------------------


def stored(values: list[float], trace: float, dim: int = 8) -> Eigenbasis:
    return Eigenbasis(torch.eye(dim)[:, :len(values)], torch.tensor(values), trace)


def test_leading_subspace_is_the_fewest_stored_vectors_holding_the_share_of_the_trace():
    basis = stored([4.0, 2.0, 1.0, 0.5], trace=10.0)  # cumulative 4, 6, 7, 7.5 of a trace of 10
    vectors, energy = leading_subspace(basis, 0.5, 0.9)
    assert vectors.shape == (8, 2) and energy == pytest.approx(0.6)
    assert leading_subspace(basis, 0.4, 0.9)[0].shape[1] == 1  # 4/10 = 0.4 exactly
    assert leading_subspace(basis, 0.7, 0.25)[0].shape[1] == 2  # 3 needed, capped at floor(0.25 * 8)
    vectors, energy = leading_subspace(basis, 0.9, 0.9)  # the stored vectors hold 0.75 < 0.9: all of them
    assert vectors.shape[1] == 4 and energy == pytest.approx(0.75)
    assert leading_subspace(stored([], trace=0.0), 0.5, 0.5)[0].shape == (8, 0)


@pytest.fixture(scope="module")
def manifest(tiny_e6b):
    return load_manifest(tiny_e6b)


@pytest.fixture(scope="module")
def factors(e4b_factors):
    return load_factors(e4b_factors)[0]


@pytest.fixture(scope="module")
def stack_shapes(tiny_e6b) -> dict[str, tuple[int, int]]:
    """[out, in] of every 2-D weight of the tiny E6B's decoder layers, by module name."""
    return {name.removesuffix(".weight"): tuple(t.shape) for name, t in load_tensors(tiny_e6b).items()
            if name.startswith(LAYERS) and t.dim() == 2}


SEAM_SLOTS = (17, 18)
KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def target_shapes(stack_shapes, slots=SEAM_SLOTS, kinds=KINDS) -> dict[str, tuple[int, int]]:
    return {f"{LAYERS}{slot}.{kind}": stack_shapes[f"{LAYERS}{slot}.{kind}"] for slot in slots for kind in kinds}


def test_factors_map_to_every_slot_holding_the_source_layer_and_grafted_kv_gets_none(factors, manifest, stack_shapes):
    shapes = target_shapes(stack_shapes, slots=(17, 18, 32), kinds=KINDS + ("self_attn.k_proj",))
    plan = plan_kfac(factors, manifest, shapes, kfac_config(kfac_energy_share=0.5, kfac_max_fraction=0.25))
    source = factors[f"{LAYERS}10.mlp.up_proj"]  # slot 18 holds source layer 10
    expected, energy = leading_subspace(source.input, 0.5, 0.25)
    assert torch.equal(plan[f"{LAYERS}18.mlp.up_proj"].input_basis, expected)
    assert plan[f"{LAYERS}18.mlp.up_proj"].input_energy_covered == energy >= 0.5
    assert f"{LAYERS}32.self_attn.k_proj" not in plan and f"{LAYERS}32.self_attn.q_proj" in plan  # k/v grafted
    assert f"{LAYERS}17.self_attn.k_proj" in plan
    first_copies = plan_kfac(factors, manifest, shapes, kfac_config(first_copy_only=True))
    assert f"{LAYERS}17.mlp.up_proj" in first_copies and f"{LAYERS}18.mlp.up_proj" not in first_copies  # L10 again


def test_a_module_without_factors_is_named_with_the_fix(factors, manifest, stack_shapes):
    without = {name: f for name, f in factors.items() if name != f"{LAYERS}10.mlp.up_proj"}
    with pytest.raises(ProtectionError, match=rf"have none for '{LAYERS}18\.mlp\.up_proj'.*factor_seam_width >= "
                                              r"seam_width.*protect_modules"):
        plan_kfac(without, manifest, target_shapes(stack_shapes), kfac_config())
    # With first_copy_only slot 18 takes no protection (its L10 is slot 10's), so it needs no factors.
    assert plan_kfac(without, manifest, target_shapes(stack_shapes), kfac_config(first_copy_only=True))


def test_the_layer_check_before_loading_names_the_trained_slot(factors, manifest):
    without_layer_10 = {name: f for name, f in factors.items() if not name.startswith(f"{LAYERS}10.")}
    with pytest.raises(ProtectionError, match=r"have none for source layer 10 \(held by the trained slot 18\)"):
        check_factor_layers(without_layer_10, manifest, set(SEAM_SLOTS), kfac_config())
    check_factor_layers(without_layer_10, manifest, {17}, kfac_config())
    check_factor_layers(without_layer_10, manifest, set(SEAM_SLOTS), kfac_config(first_copy_only=True))


def test_factors_of_another_width_are_refused(factors, manifest, stack_shapes):
    shapes = dict(target_shapes(stack_shapes), **{f"{LAYERS}17.mlp.up_proj": (7, 5)})
    with pytest.raises(ProtectionError, match=rf"'{LAYERS}17\.mlp\.up_proj' span \[out, in\] = \[128, 64\], but the "
                                              r"stack's module is \[7, 5\]"):
        plan_kfac(factors, manifest, shapes, kfac_config())


def test_a_share_beyond_the_stored_basis_protects_every_stored_vector_and_names_the_modules(factors, manifest,
                                                                                           stack_shapes, caplog):
    shapes = target_shapes(stack_shapes)
    plan = plan_kfac(factors, manifest, shapes, kfac_config(kfac_energy_share=0.95, kfac_max_fraction=0.9))
    stored_rank = factors[f"{LAYERS}17.mlp.up_proj"].input.vectors.shape[1]  # random_factors keeps 0.9 of the trace
    assert plan[f"{LAYERS}17.mlp.up_proj"].input_basis.shape[1] == stored_rank
    assert "kfac_energy_share 0.95 is more than the stored K-FAC basis holds for 20 module side(s)" in caplog.text
    assert f"{LAYERS}17.mlp.up_proj input (0.9" in caplog.text and "factor_energy_share" in caplog.text


# ---- the projections ------------------------------------------------------------------------------------------


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 12, bias=False)

    def forward(self, x):
        return self.proj(x)


def orthonormal(dim: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(dim, k, generator=torch.Generator().manual_seed(seed)))[0]


def projected_lora() -> tuple[nn.Module, SubspaceProtection]:
    """A LoRA (random A and B) on one Linear, with a protected input basis U [16, 3] and output basis V [12, 2]."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    return model, SubspaceProtection(orthonormal(16, 3, 1), orthonormal(12, 2, 2), 0.5, 0.5)


def test_the_projected_factors_neither_read_nor_write_the_protected_directions():
    model, protection = projected_lora()
    layer = model.base_model.model.proj
    attach(model, {"proj": protection})
    inputs = torch.randn(5, 3) @ protection.input_basis.T  # in span(U)
    assert torch.allclose(layer(inputs), layer.base_layer(inputs), atol=1e-6)
    update = layer(x := torch.randn(5, 16)) - layer.base_layer(x)
    assert update.abs().max() > 1e-2 and (update @ protection.output_basis).abs().max() < 1e-6


def test_bake_projects_the_weights_and_keeps_the_function():
    model, protection = projected_lora()
    layer = model.base_model.model.proj
    attach(model, {"proj": protection})
    x = torch.randn(5, 16)
    before = layer(x)
    bake(model, {"proj": protection})
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert (lora_a @ protection.input_basis).abs().max() < 1e-6 * lora_a.abs().max()
    assert (protection.output_basis.T @ lora_b).abs().max() < 1e-6 * lora_b.abs().max()
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)


def test_the_bases_are_non_persistent_buffers():
    model, protection = projected_lora()
    keys = set(model.state_dict())
    attach(model, {"proj": protection})
    assert set(model.state_dict()) == keys


# ---- config and protect_modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"protection": "diagonal"}, "got 'diagonal'"),
    ({"protect": True, "fisher": "f", "factors": "g"}, "`factors:` is set but protection is 'coordinates'"),
    ({"protect": True, "protection": "kfac"}, "protection: kfac needs `factors:`"),
    ({"kfac_energy_share": 1.0}, "protection kfac_energy_share must be in (0, 1), got 1.0"),
    ({"kfac_max_fraction": 0.0}, "protection kfac_max_fraction must be in (0, 1), got 0.0"),
    ({"protect_modules": ()}, "protect_modules must be a non-empty list of module names"),
])
def test_protection_settings_are_checked(overrides, message):
    with pytest.raises(HealConfigError) as error:
        HealConfig(**{"stack": "s", "datasets": (), "protect": False, **overrides})
    assert message in str(error.value)


def test_the_factors_default_to_the_file_beside_the_fisher():
    heal = HealConfig(stack="s", datasets=(), fisher="out/fisher/fisher.safetensors", protection="kfac")
    assert heal.factors_path == Path("out/fisher/fisher_factors.safetensors")
    assert kfac_config().factors_path == Path("f.safetensors")


def test_protect_modules_keeps_the_targets_ending_in_a_name():
    names = [f"{LAYERS}17.self_attn.q_proj", f"{LAYERS}17.self_attn.o_proj", f"{LAYERS}17.mlp.down_proj"]
    assert protected_modules(names, None) == names
    assert protected_modules(names, ("q_proj", "mlp.down_proj")) == [names[0], names[2]]
    with pytest.raises(ProtectionError, match=r"protect_modules \['roj'\] match no targeted module; the targets are "
                                              r"\['down_proj', 'o_proj', 'q_proj'\]"):
        protected_modules(names, ("q_proj", "roj"))


# ---- the audit file ---------------------------------------------------------------------------------------------


def test_the_audit_file_round_trips_the_bases_and_plans_of_another_kind_differ(factors, manifest, stack_shapes,
                                                                               tmp_path):
    shapes = target_shapes(stack_shapes)
    heal = kfac_config()
    plan = plan_kfac(factors, manifest, shapes, heal)
    save_protection(tmp_path / PROTECTION_FILE, plan, shapes, heal)
    loaded = load_protection(tmp_path / PROTECTION_FILE)
    assert plan_difference(loaded, plan) is None
    assert all(isinstance(entry, SubspaceProtection) for entry in loaded.values())
    report = protection_report(tmp_path)
    module = f"{LAYERS}17.mlp.down_proj"
    assert report["kind"] == "kfac" and report["config"]["kfac_energy_share"] == 0.5
    assert report["modules"][module] == {"input_rank": plan[module].protected_dims[0], "in_features": 128,
                                         "input_energy_covered": plan[module].input_energy_covered,
                                         "output_rank": plan[module].protected_dims[1], "out_features": 64,
                                         "output_energy_covered": plan[module].output_energy_covered}
    smaller = plan_kfac(factors, manifest, shapes, kfac_config(kfac_energy_share=0.3))
    assert plan_difference(loaded, smaller) == f"the protected input eigenvectors of {sorted(plan)[0]!r} differ"
    coordinates = {name: ModuleProtection(torch.tensor([0]), torch.tensor([0]), 0.5, 0.5) for name in plan}
    assert plan_difference(loaded, coordinates) == (f"the recorded plan protects {sorted(plan)[0]!r} with "
                                                    "protection: kfac, this run with protection: coordinates")


# ---- a heal: the guarantee on disk ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("kfac-data") / "chat.jsonl", rows_for("messages", 8))


def kfac_recipe(path: Path, stack, factors, chat, output_dir, **overrides) -> Path:
    """heal_recipe with protection: kfac from `factors` alone (no `fisher:`), at energy share 0.5."""
    return heal_recipe(path, stack, None, chat, output_dir,
                       **{"protection": "kfac", "factors": str(factors), "kfac_energy_share": 0.5,
                          "kfac_max_fraction": 0.25, **overrides})


# The tiny heal's 40 targets (seam_width 1): q, o, gate, up, down of slots 17, 18, 33, 34, 49, 50 and k, v of 17, 18,
# 34 (slots 49 and 50 read shared K/V) take their source layer's factors; the grafted k, v of slots 32 and 33 do not.
PROTECTED = 36


@pytest.fixture(scope="module")
def fp32_stack(tiny_e6b, tmp_path_factory) -> Path:
    """The tiny E6B with its tensors and config in fp32, so that the merge rounds W + ΔW to fp32: the guarantee
    then holds to KFAC_RELATIVE_BOUND on the merged weights read from disk. (A bf16 merge adds bf16 rounding in
    every direction: tests/checkpoints.kfac_bounds, and the bf16 heal below.)"""
    folder = Path(shutil.copytree(tiny_e6b, tmp_path_factory.mktemp("fp32-stack") / "e6b"))
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        save_file({name: t.float() for name, t in load_file(shard).items()}, shard, metadata=metadata)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
    return folder


@pytest.fixture(scope="module")
def kfac_healed(fp32_stack, e4b_factors, chat, tmp_path_factory) -> Path:
    """A kfac-protected 4-step heal of the fp32 stack (AdamW, weight decay 0.5, lr 5e-2) saving checkpoint-2,
    checkpoint-4 and merged/."""
    folder = tmp_path_factory.mktemp("kfac-healed")
    recipe = kfac_recipe(folder / "r.yaml", fp32_stack, e4b_factors, chat, folder / "out", max_steps=4,
                         save_strategy="steps", save_steps=2)
    assert main([str(recipe)]) == 0
    return folder / "out"


def relative_residuals(raw: dict, merged: dict, module: str, protection: SubspaceProtection) -> tuple[float, float]:
    """(|ΔW U|max, |Vᵀ ΔW|max) / |ΔW|max of one module, ΔW = merged − raw."""
    delta = merged[f"{module}.weight"].double() - raw[f"{module}.weight"].double()
    return tuple(residual / float(delta.abs().max()) for residual in subspace_residuals(delta, protection))


def test_the_merged_checkpoint_keeps_delta_w_out_of_the_protected_bases(kfac_healed, fp32_stack):
    assert_protection_holds(fp32_stack, kfac_healed)  # kfac_bounds, and every module trained
    raw, merged = load_tensors(fp32_stack), load_tensors(kfac_healed / "merged")
    plan = load_protection(kfac_healed / PROTECTION_FILE)
    assert len(plan) == PROTECTED and all(min(p.protected_dims) > 0 for p in plan.values())
    for module, protection in plan.items():
        assert merged[f"{module}.weight"].dtype == torch.float32
        assert max(relative_residuals(raw, merged, module, protection)) <= KFAC_RELATIVE_BOUND, module
        delta = merged[f"{module}.weight"] - raw[f"{module}.weight"]
        assert delta.abs().max() > 1e-2, f"{module}: ΔW too small to show anything"


@pytest.fixture(scope="module")
def unprotected(fp32_stack, chat, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kfac-unprotected")
    recipe = heal_recipe(folder / "r.yaml", fp32_stack, None, chat, folder / "out", protect=False, max_steps=4)
    assert main([str(recipe)]) == 0
    return folder / "out"


def test_negative_control_without_protection_the_same_heal_moves_the_protected_directions(unprotected, kfac_healed,
                                                                                         fp32_stack):
    raw, merged = load_tensors(fp32_stack), load_tensors(unprotected / "merged")
    for module, protection in load_protection(kfac_healed / PROTECTION_FILE).items():
        residuals = relative_residuals(raw, merged, module, protection)
        assert min(residuals) > 1000 * KFAC_RELATIVE_BOUND, f"{module}: {residuals}"


def adapter_residuals(folder: Path, plan: dict[str, SubspaceProtection]) -> list[tuple[float, float]]:
    """(|A U|max / |A|max, |Vᵀ B|max / |B|max) of every planned module in folder's adapter file."""
    adapter = load_file(folder / ADAPTER)
    residuals = []
    for module, protection in plan.items():
        lora_a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
        lora_b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
        residuals.append((float((lora_a @ protection.input_basis.double()).abs().max() / lora_a.abs().max()),
                          float((protection.output_basis.double().T @ lora_b).abs().max() / lora_b.abs().max())))
    return residuals


def test_every_saved_adapter_is_projected_by_the_save_path(kfac_healed):
    plan = load_protection(kfac_healed / PROTECTION_FILE)
    for folder in (kfac_healed / "checkpoint-2", kfac_healed / "checkpoint-4", kfac_healed):
        assert plan_difference(load_protection(folder / PROTECTION_FILE), plan) is None, folder
        assert max(max(pair) for pair in adapter_residuals(folder, plan)) <= KFAC_RELATIVE_BOUND, folder


def test_negative_control_without_the_save_path_bake_adamw_moves_the_weights_into_the_bases(
        tiny_e6b, e4b_factors, chat, tmp_path, monkeypatch):
    """The forward projects and the trainer bakes the weights at the start, but AdamW's per-entry scaling of a
    projected gradient is not projected: without the save path's bake, checkpoint-1's file holds Vᵀ B != 0 in
    every module (B's first step; A, whose gradient is 0 while PEFT's B is 0, follows once B has moved)."""
    monkeypatch.setattr("heal.protection.bake_adapter_file", lambda path, plan: None)
    recipe = kfac_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_factors, chat, tmp_path / "out", max_steps=1,
                         save_strategy="steps", save_steps=1, merge=False)
    assert main([str(recipe)]) == 0
    plan = load_protection(tmp_path / "out" / "checkpoint-1" / PROTECTION_FILE)
    assert all(b > 1000 * KFAC_RELATIVE_BOUND for _, b in adapter_residuals(tmp_path / "out" / "checkpoint-1", plan))


def test_the_card_reports_the_kind_and_the_energy_covered(kfac_healed):
    card = (kfac_healed / "README.md").read_text()
    section = card.split("\n## Protection\n", 1)[1].split("\n## ", 1)[0]
    assert "K-FAC eigen-subspace protection" in section and "kfac_energy_share 0.5" in section
    assert "input energy covered (min / median / max)" in section
    assert "| seam | 36 of 36 |" in section
    assert (kfac_healed / "merged" / "README.md").read_text().count("K-FAC eigen-subspace protection") == 1


# ---- resume --------------------------------------------------------------------------------------------------


def test_a_resume_under_another_kind_or_other_bases_is_refused(kfac_healed, tiny_e6b, e4b_fisher, e4b_factors, chat,
                                                               tmp_path, caplog):
    out = Path(shutil.copytree(kfac_healed, tmp_path / "o"))
    other_share = kfac_recipe(tmp_path / "a.yaml", tiny_e6b, e4b_factors, chat, out, max_steps=6, merge=False,
                              kfac_energy_share=0.3)
    assert main([str(other_share)]) == 2
    assert f"cannot resume from {out / 'checkpoint-4'}: the protected input eigenvectors of" in caplog.text
    coordinates = heal_recipe(tmp_path / "b.yaml", tiny_e6b, e4b_fisher, chat, out, max_steps=6, merge=False)
    assert main([str(coordinates)]) == 2
    assert "with protection: kfac, this run with protection: coordinates" in caplog.text


# ---- protect_modules, for both constructions -------------------------------------------------------------------


def targeted_modules(folder: Path) -> set[str]:
    return {name.split("base_model.model.")[1].split(".lora_")[0] for name in load_file(folder / ADAPTER)}


@pytest.mark.parametrize("protection", ["coordinates", "kfac"])
def test_protect_modules_protects_only_the_named_targets(protection, tiny_e6b, e4b_fisher, e4b_factors, chat,
                                                         tmp_path):
    """On the bf16 stack: the kfac merge holds the guarantee to bf16 rounding (tests/checkpoints.kfac_bounds)."""
    overrides = dict(max_steps=2, protect_modules=["q_proj", "mlp.down_proj"])
    if protection == "kfac":
        recipe = kfac_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_factors, chat, tmp_path / "out", **overrides)
    else:
        recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "out", **overrides)
    assert main([str(recipe)]) == 0
    plan = load_protection(tmp_path / "out" / PROTECTION_FILE)
    named = {m for m in targeted_modules(tmp_path / "out") if m.endswith((".q_proj", ".mlp.down_proj"))}
    assert set(plan) == named and len(named) == 12 and {entry.kind for entry in plan.values()} == {protection}
    assert protection_report(tmp_path / "out")["config"]["protect_modules"] == ["q_proj", "mlp.down_proj"]
    assert_protection_holds(tiny_e6b, tmp_path / "out")


# ---- heal.plan -------------------------------------------------------------------------------------------------


def test_heal_plan_prints_the_heals_bases_and_their_memory(kfac_healed, tiny_e6b, e4b_factors, chat, tmp_path):
    heal, sft = load_config(kfac_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_factors, chat, tmp_path / "out"))
    plan = build_heal_plan(heal, sft, device="cpu")
    assert plan_difference(load_protection(kfac_healed / PROTECTION_FILE), plan.protection.plan) is None
    bases = sum(4 * (p.input_basis.numel() + p.output_basis.numel()) for p in plan.protection.plan.values())
    assert plan.memory("ZeRO-3", 8)["protection bases (kfac)"] == plan.memory("ZeRO-2", 1)["protection bases (kfac)"]
    assert plan.memory("ZeRO-3", 8)["protection bases (kfac)"] == bases > 0
    printed = format_plan(plan, (1, 2), 80.0)
    assert "K-FAC eigen-subspace protection (36 of 40 targets have source factors)" in printed
    assert "layers.32.self_attn.k_proj: unprotected (no source Fisher)" in printed and "protection bases" in printed


# ---- errors, before any model loads ------------------------------------------------------------------------------


def rewrite_factors(source: Path, target: Path, edit_metadata=None, drop: str | None = None) -> Path:
    """A copy of a factors file with its metadata edited, or without the modules whose name starts with `drop`."""
    factors, metadata = load_factors(source)
    if edit_metadata is None:
        save_factors(target, {name: f for name, f in factors.items() if not name.startswith(drop)}, metadata)
        return target
    with safe_open(source, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit_metadata(metadata)
    save_file(tensors, target, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)})
    return target


def other_model(metadata: dict) -> None:
    metadata["model"] = "google/gemma-4-E4B"
    metadata["model_shard_sha256"] = {name: "0" * 64 for name in metadata["model_shard_sha256"]}


@pytest.mark.parametrize("make_factors, message", [
    (lambda source, target: target, "does not exist; compute it with `python -m fisher`"),
    (lambda source, target: rewrite_factors(source, target, lambda m: m.update(format_version=2)),
     "has format_version 2; this code reads 1"),
    (lambda source, target: rewrite_factors(source, target, other_model),
     "was computed on 'google/gemma-4-E4B', but"),
    (lambda source, target: rewrite_factors(source, target, drop=f"{LAYERS}10."),
     "have none for source layer 10 (held by the trained slot 18)"),
], ids=["missing", "format-version", "other-model", "missing-layer"])
def test_bad_factors_are_a_named_error_before_any_model_loads(make_factors, message, tiny_e6b, e4b_factors, chat,
                                                              tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("heal.train._load_model", lambda heal, sft: pytest.fail("the model was loaded"))
    factors = make_factors(e4b_factors, tmp_path / "factors.safetensors")
    assert main([str(kfac_recipe(tmp_path / "r.yaml", tiny_e6b, factors, chat, tmp_path / "out"))]) == 2
    assert message in caplog.text


def test_a_module_missing_from_layer_factors_is_named_once_the_targets_are_known(tiny_e6b, e4b_factors, chat,
                                                                                tmp_path, caplog):
    caplog.set_level(logging.INFO)
    factors = rewrite_factors(e4b_factors, tmp_path / "factors.safetensors", drop=f"{LAYERS}10.mlp.up_proj")
    assert main([str(kfac_recipe(tmp_path / "r.yaml", tiny_e6b, factors, chat, tmp_path / "out"))]) == 2
    assert f"have none for '{LAYERS}18.mlp.up_proj'" in caplog.text
    assert not (tmp_path / "out" / ADAPTER).exists()
