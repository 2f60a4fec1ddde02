"""heal/train.py on the tiny E6B, with a Fisher computed by fisher/ on the tiny E4B: the pipeline's
three stages talking through files, in one process. The DeepSpeed ZeRO-2/3 runs on two processes are in
tests/test_heal_distributed.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from heal.config import HealConfigError, load_config
from heal.protection import (
    PROTECTION_FILE,
    ModuleProtection,
    load_protection,
    plan_difference,
    plan_protection,
    slot_fisher,
)
from heal.train import main
from stack.manifest import load_manifest

from .checkpoints import assert_loads_clean, load_tensors
from .conftest import REPO, heal_recipe
from .fisher_support import rows_for, write_jsonl

LAYERS = "model.language_model.layers."


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("heal-data") / "chat.jsonl", rows_for("messages", 8))


@pytest.fixture(scope="module")
def healed(tiny_e6b, e4b_fisher, chat, tmp_path_factory):
    folder = tmp_path_factory.mktemp("healed")
    assert main([str(heal_recipe(folder / "heal.yaml", tiny_e6b, e4b_fisher, chat, folder / "out"))]) == 0
    return folder / "out"


def test_writes_adapter_protection_and_a_merged_stack(healed, tiny_e6b):
    assert (healed / "adapter_model.safetensors").is_file() and (healed / "adapter_config.json").is_file()
    assert (healed / PROTECTION_FILE).is_file()
    merged = healed / "merged"
    assert (merged / "stack.json").read_bytes() == (tiny_e6b / "stack.json").read_bytes()
    assert_loads_clean(merged)


def test_targets_are_the_seam_slots_and_the_grafted_kv(healed):
    adapter = load_file(healed / "adapter_model.safetensors")
    slots = {int(name.split("layers.")[1].split(".")[0]) for name in adapter}
    assert slots == {17, 18, 33, 34, 49, 50} | {32}  # ±1 around seams 18, 34, 50; slot 32's grafted k/v
    assert any("layers.32.self_attn.k_proj" in n for n in adapter) and not any("layers.32.mlp" in n for n in adapter)


def test_protected_coordinates_are_unchanged_and_the_rest_moved(healed, tiny_e6b):
    raw, merged = load_tensors(tiny_e6b), load_tensors(healed / "merged")
    plan = load_protection(healed / PROTECTION_FILE)
    assert plan and all(len(p.inputs) and len(p.outputs) for p in plan.values())
    for module, protection in plan.items():
        name = f"{module}.weight"
        assert torch.equal(merged[name][:, protection.inputs], raw[name][:, protection.inputs]), name
        assert torch.equal(merged[name][protection.outputs, :], raw[name][protection.outputs, :]), name
        assert not torch.equal(merged[name], raw[name]), f"{name} did not train"
    assert f"{LAYERS}32.self_attn.k_proj" not in plan  # grafted: no source Fisher, unprotected


def test_untargeted_weights_are_bit_identical(healed, tiny_e6b):
    raw, merged = load_tensors(tiny_e6b), load_tensors(healed / "merged")
    adapter = load_file(healed / "adapter_model.safetensors")
    targeted = {n.split("base_model.model.")[1].split(".lora_")[0] + ".weight" for n in adapter}
    assert raw.keys() == merged.keys()
    for name in raw.keys() - targeted:
        assert torch.equal(raw[name], merged[name]), name


def test_without_protection_the_same_coordinates_change(healed, tiny_e6b, chat, tmp_path):
    assert main([str(heal_recipe(tmp_path / "heal.yaml", tiny_e6b, None, chat, tmp_path / "out", protect=False))]) == 0
    raw, merged = load_tensors(tiny_e6b), load_tensors(tmp_path / "out" / "merged")
    plan = load_protection(healed / PROTECTION_FILE)
    changed = [m for m, p in plan.items()
               if not torch.equal(merged[f"{m}.weight"][:, p.inputs], raw[f"{m}.weight"][:, p.inputs])]
    assert len(changed) == len(plan)


# ---- recipes and bad input ------------------------------------------------------------------------------------


def test_the_heal_recipe_loads():
    heal, sft = load_config(REPO / "recipes" / "heal.yaml", use_cpu=True)  # the recipe is for GPUs (bf16)
    # No protection by default: every construction measured ended further from the source (docs/results.md).
    assert not heal.protect and heal.seam_width == 2 and sft.assistant_only_loss and sft.report_to == ["tensorboard"]


def test_unknown_key(tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    assert main([str(heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o", seam_widht=2))]) == 2
    assert "unknown key(s) ['seam_widht']" in caplog.text


def test_missing_manifest(tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    stack = tmp_path / "no-manifest"
    shutil.copytree(tiny_e6b, stack)
    (stack / "stack.json").unlink()
    assert main([str(heal_recipe(tmp_path / "r.yaml", stack, e4b_fisher, chat, tmp_path / "o"))]) == 2
    assert "stack.json not found" in caplog.text and "list the modules to train in `targets:`" in caplog.text


def test_targets_that_match_nothing(tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o", modules=["qkv_proj"])
    assert main([str(recipe)]) == 2
    assert "modules ['qkv_proj'] match no Linear of the decoder layers" in caplog.text


def test_fisher_from_another_model(tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    wrong = dict(load_file(e4b_fisher))
    wrong[f"{LAYERS}3.mlp.up_proj.weight"] = torch.ones(7, 7)
    with safe_open(e4b_fisher, "pt") as f:
        save_file(wrong, tmp_path / "wrong.safetensors", metadata=f.metadata())  # fisher's metadata, a wrong shape
    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, tmp_path / "wrong.safetensors", chat, tmp_path / "o")
    assert main([str(recipe)]) == 2
    assert f"Fisher tensor '{LAYERS}3.mlp.up_proj.weight' has shape [7, 7]" in caplog.text


@pytest.mark.parametrize("share", [0.0, 1.5])
def test_protected_share_outside_zero_one(tmp_path, tiny_e6b, e4b_fisher, chat, caplog, share):
    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o", mass_share=share)
    assert main([str(recipe)]) == 2
    assert f"protection mass_share must be in (0, 1), got {share}" in caplog.text


def test_protect_needs_a_fisher(tmp_path, tiny_e6b, chat):
    with pytest.raises(HealConfigError, match="protect: true needs `fisher:`"):
        load_config(heal_recipe(tmp_path / "r.yaml", tiny_e6b, None, chat, tmp_path / "o"))
    assert json.loads((tiny_e6b / "stack.json").read_text())["num_hidden_layers"] == 66


def test_qlora_without_a_gpu_is_a_clear_error(tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o", load_in_4bit=True,
                         merge=False)
    assert main([str(recipe)]) == 2
    assert "load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes" in caplog.text


def test_datasets_of_different_formats_are_a_clear_error(tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    text = write_jsonl(tmp_path / "text.jsonl", rows_for("text", 4))
    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o",
                         datasets=[{"path": str(chat)}, {"path": str(text)}])
    assert main([str(recipe)]) == 2
    assert "the datasets mix TRL formats" in caplog.text




def test_explicit_targets_heal_a_stack_without_manifest(tmp_path, tiny_e6b, chat):
    stack = tmp_path / "no-manifest"
    shutil.copytree(tiny_e6b, stack)
    (stack / "stack.json").unlink()
    targets = [f"{LAYERS}18.mlp.up_proj", f"{LAYERS}18.self_attn.o_proj"]
    recipe = heal_recipe(tmp_path / "r.yaml", stack, None, chat, tmp_path / "o", protect=False, merge=False,
                         targets=targets)
    assert main([str(recipe)]) == 0
    adapter = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert {n.split("base_model.model.")[1].split(".lora_")[0] for n in adapter} == set(targets)


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_point_at_existing_deepspeed_files(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    deepspeed_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if deepspeed_file:
        stage = json.loads((REPO / deepspeed_file).read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in path.name
    assert config.distributed_type.value in ("NO", "DEEPSPEED")


def test_tensorboard_is_the_default_logger(tmp_path, tiny_e6b, e4b_fisher, chat):
    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o")
    text = recipe.read_text().replace("report_to: none\n", "")
    recipe.write_text(text)
    _, sft = load_config(recipe)
    assert sft.report_to == ["tensorboard"]


# ---- checkpoints, resume and the audit file ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tiny_e6b, e4b_fisher, chat, tmp_path_factory):
    """A protected heal saving checkpoint-2 and checkpoint-4."""
    folder = tmp_path_factory.mktemp("checkpointed")
    recipe = heal_recipe(folder / "r.yaml", tiny_e6b, e4b_fisher, chat, folder / "out", max_steps=4,
                         save_strategy="steps", save_steps=2, merge=False)
    assert main([str(recipe)]) == 0
    return folder / "out"


def protected_entries(checkpoint, plan: dict[str, ModuleProtection] | None = None) -> list[torch.Tensor]:
    """A[:, protected inputs] and B[protected outputs, :] of every protected module in the checkpoint's
    adapter, with the coordinates of `plan` (default: the plan recorded in that checkpoint)."""
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    entries = []
    for module, protection in (plan or load_protection(checkpoint / PROTECTION_FILE)).items():
        entries.append(adapter[f"base_model.model.{module}.lora_A.weight"][:, protection.inputs])
        entries.append(adapter[f"base_model.model.{module}.lora_B.weight"][protection.outputs, :])
    return entries


def test_every_checkpoint_holds_the_protected_entries_at_zero(checkpointed):
    """The initial bake zeroes them, the masks give them zero gradient, so AdamW (with weight decay) keeps them 0;
    and every save bakes the adapter file it wrote."""
    for step in (2, 4):
        entries = protected_entries(checkpointed / f"checkpoint-{step}")
        assert entries and all(e.numel() for e in entries)
        assert all(torch.count_nonzero(e) == 0 for e in entries), f"checkpoint-{step}"
    adapter = load_file(checkpointed / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.count_nonzero(t) for name, t in adapter.items() if "lora_B" in name)  # and it trained


def heal_without_the_initial_bake(tiny_e6b, e4b_fisher, chat, folder, monkeypatch) -> Path:
    """A protected 2-step heal saving checkpoint-1 and checkpoint-2, with the in-memory bake switched off: PEFT
    initialises A at random, and the masks and AdamW keep its protected columns non-zero in memory."""
    monkeypatch.setattr("heal.trainer.bake", lambda model, plan: None)
    recipe = heal_recipe(folder / "r.yaml", tiny_e6b, e4b_fisher, chat, folder / "o", max_steps=2,
                         save_strategy="steps", save_steps=1, merge=False)
    assert main([str(recipe)]) == 0
    return folder / "o"


def fisher_plan(stack, fisher, checkpoint) -> dict[str, ModuleProtection]:
    """The plan computed here from the Fisher file, for the modules the checkpoint's adapter trains, at the test
    recipe's mass_share 0.5 and max_fraction 0.25."""
    modules = {name.split("base_model.model.")[1].split(".lora_")[0]
               for name in load_file(checkpoint / "adapter_model.safetensors")}
    return plan_protection(slot_fisher(load_file(fisher), load_manifest(stack)), sorted(modules), 0.5, 0.25)


def test_every_save_bakes_its_adapter_file_even_without_the_initial_bake(tiny_e6b, e4b_fisher, chat, tmp_path,
                                                                         monkeypatch):
    """Every checkpoint-N/ and the final output_dir go through HealTrainer.save_model: the adapter file holds the
    protected entries of the Fisher's plan at exactly zero, and protection.safetensors records that plan."""
    out = heal_without_the_initial_bake(tiny_e6b, e4b_fisher, chat, tmp_path, monkeypatch)
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        plan = fisher_plan(tiny_e6b, e4b_fisher, folder)
        assert plan and plan_difference(load_protection(folder / PROTECTION_FILE), plan) is None, folder
        entries = protected_entries(folder, plan)
        assert all(e.numel() for e in entries) and all(torch.count_nonzero(e) == 0 for e in entries), folder


def test_negative_control_without_the_save_path_bake_a_checkpoint_holds_non_zero_protected_entries(
        tiny_e6b, e4b_fisher, chat, tmp_path, monkeypatch):
    """The same heal with the save path's bake switched off too: PEFT's random A reaches checkpoint-1's file."""
    monkeypatch.setattr("heal.protection.bake_adapter_file", lambda path, plan: None)
    out = heal_without_the_initial_bake(tiny_e6b, e4b_fisher, chat, tmp_path, monkeypatch)
    plan = fisher_plan(tiny_e6b, e4b_fisher, out / "checkpoint-1")
    assert any(torch.count_nonzero(e) for e in protected_entries(out / "checkpoint-1", plan))


def test_resume_refuses_a_checkpoint_of_another_protection_plan(checkpointed, tiny_e6b, e4b_fisher, chat, tmp_path,
                                                                  caplog):
    out = Path(shutil.copytree(checkpointed, tmp_path / "o"))
    other_share = heal_recipe(tmp_path / "a.yaml", tiny_e6b, e4b_fisher, chat, out, max_steps=6, merge=False,
                              mass_share=0.3)
    assert main([str(other_share)]) == 2
    assert f"cannot resume from {out / 'checkpoint-4'}: the protected" in caplog.text
    assert "coordinates of" in caplog.text
    unprotected = heal_recipe(tmp_path / "b.yaml", tiny_e6b, None, chat, out, max_steps=6, merge=False, protect=False)
    assert main([str(unprotected)]) == 2
    assert "it was written with Fisher protection, and this run has protect: false" in caplog.text
    assert f"delete {out}/checkpoint-*" in caplog.text
    assert (out / PROTECTION_FILE).is_file()  # refused before anything was touched


def test_an_unprotected_heal_removes_a_stale_audit_file_and_its_checkpoints_refuse_protection(
        checkpointed, tiny_e6b, e4b_fisher, chat, tmp_path, caplog):
    out = tmp_path / "o"
    out.mkdir()
    shutil.copyfile(checkpointed / PROTECTION_FILE, out / PROTECTION_FILE)  # an earlier protected heal's audit file
    recipe = heal_recipe(tmp_path / "a.yaml", tiny_e6b, None, chat, out, protect=False, max_steps=2,
                         save_strategy="steps", save_steps=2, merge=False)
    assert main([str(recipe)]) == 0
    assert not (out / PROTECTION_FILE).exists() and f"removing {out / PROTECTION_FILE}" in caplog.text
    assert not (out / "checkpoint-2" / PROTECTION_FILE).exists()
    protected = heal_recipe(tmp_path / "b.yaml", tiny_e6b, e4b_fisher, chat, out, max_steps=4, merge=False)
    assert main([str(protected)]) == 2
    assert f"cannot resume from {out / 'checkpoint-2'}: it was written without Fisher protection" in caplog.text


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "cosine"])
def test_a_constant_rate_heal_resumed_to_more_steps_equals_the_longer_heal(tiny_e6b, chat, tmp_path, schedule):
    """The study extends a curve by resuming a shorter run's last checkpoint with a larger max_steps
    (demo/study.py, extend_from_shorter_run). Under a constant rate the 2-step heal resumed to 4 steps is the 4-step
    heal, bit for bit: the data order, the RNG and the rate do not depend on max_steps. Under cosine the rate does,
    so it differs: the study extends constant-rate runs only."""
    # 3 batches of 2 per epoch: the resumed steps cross an epoch boundary, where the data order is reshuffled.
    common = dict(lr_scheduler_type=schedule, warmup_steps=1, save_strategy="steps", save_steps=2, merge=False,
                  protect=False, num_examples=6)
    straight = heal_recipe(tmp_path / "s.yaml", tiny_e6b, None, chat, tmp_path / "straight", max_steps=4, **common)
    short = heal_recipe(tmp_path / "a.yaml", tiny_e6b, None, chat, tmp_path / "extended", max_steps=2, **common)
    longer = heal_recipe(tmp_path / "b.yaml", tiny_e6b, None, chat, tmp_path / "extended", max_steps=4, **common)
    assert main([str(straight)]) == 0 and main([str(short)]) == 0 and main([str(longer)]) == 0
    expected = load_file(tmp_path / "straight" / "checkpoint-4" / "adapter_model.safetensors")
    extended = load_file(tmp_path / "extended" / "checkpoint-4" / "adapter_model.safetensors")
    assert expected.keys() == extended.keys()
    if schedule == "cosine":
        assert not all(torch.equal(extended[name], expected[name]) for name in expected)
    else:
        for name in expected:
            torch.testing.assert_close(extended[name], expected[name], rtol=0, atol=0, msg=name)


def test_a_rerun_resumes_from_the_last_checkpoint(checkpointed, tmp_path, tiny_e6b, e4b_fisher, chat, caplog):
    caplog.set_level(logging.INFO, logger="heal")
    out = shutil.copytree(checkpointed, tmp_path / "o")  # 4 steps, checkpoint-2 and checkpoint-4, the same plan
    longer = heal_recipe(tmp_path / "b.yaml", tiny_e6b, e4b_fisher, chat, out, max_steps=5, save_strategy="no",
                         merge=False)
    assert main([str(longer)]) == 0
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text
    state = json.loads((tmp_path / "o" / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]
    # The token count carries on from the checkpoint's (TRL keeps it outside the saved state: HealTrainer restores it)
    tokens = [e["num_tokens"] for e in state["log_history"] if "num_tokens" in e]
    assert len(tokens) == 5 and tokens == sorted(tokens) and tokens[4] - tokens[3] <= tokens[3] / 2, tokens
