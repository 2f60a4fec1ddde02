"""python -m heal.plan: targets, trainable parameters, protection and the memory model, without weights.

Full size: the seed recipe's E6B planned from a headers-only E4B (bench/headers_only_e6b.py), checked
against a hand count from E4B's dimensions. Tiny: the protection plan against heal/train.py's, and the
activation formula against the bytes autograd really saves in a forward of the tiny stack.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.headers_only_e6b import build as build_headers_only_e6b
from fisher.file import FisherFileError
from heal.config import load_config
from heal.plan import GB, STAGES, activation_bytes, build_heal_plan, format_plan, main, target_layers
from heal.protection import ProtectionError, plan_protection, slot_fisher
from stack.manifest import StackManifest, load_manifest

from .conftest import REPO, SEED_SOURCE_LAYERS, heal_recipe
from .fisher_support import rows_for, write_jsonl

# google/gemma-4-E4B-it's text dimensions (bench/checkpoints.py gemma4_e4b).
HIDDEN, FFN, HEADS, KV_HEADS = 2560, 10240, 8, 2
SEAM_SLOTS = [*range(16, 20), *range(32, 36), *range(48, 52)]  # ±2 around the seams at slots 18, 34, 50
GRAFTED = {32, 33}  # source layers 24, 25 were KV consumers; their slots now compute K/V
FIRST_KV_SHARED_SLOT = 40  # the E6B's trailing run of KV-consumer slots (source layers 24-33, then 26-41)


def head_dim(slot: int) -> int:
    return 512 if SEED_SOURCE_LAYERS[slot] % 6 == 5 else 256  # every 6th E4B layer is full attention


def hand_count(rank: int = 16) -> tuple[int, int]:
    """(modules, LoRA parameters) of recipes/heal.yaml on the E6B: Σ r·(in + out) over the targets."""
    modules = params = 0
    for slot in SEAM_SLOTS:
        q = HEADS * head_dim(slot)
        shapes = [(HIDDEN, q), (q, HIDDEN), (HIDDEN, FFN), (HIDDEN, FFN), (FFN, HIDDEN)]
        if slot < FIRST_KV_SHARED_SLOT:
            shapes += [(HIDDEN, KV_HEADS * head_dim(slot))] * 2
        modules += len(shapes)
        params += sum(rank * (i + o) for i, o in shapes)
    return modules, params


@pytest.fixture(scope="module")
def e6b_headers(tmp_path_factory):
    return build_headers_only_e6b(tmp_path_factory.mktemp("e6b-headers"))


def full_size_plan(stack, tmp_path, recipe="heal.yaml", **overrides):
    heal, sft = load_config(REPO / "recipes" / recipe, use_cpu=True, stack=str(stack),
                            fisher=str(tmp_path / "absent.safetensors"), **overrides)
    return build_heal_plan(heal, sft)


def test_full_size_e6b_targets_and_trainable_parameters_match_a_hand_count(e6b_headers, tmp_path):
    plan = full_size_plan(e6b_headers, tmp_path)
    assert (len(plan.targets), plan.lora_parameters) == hand_count() == (76, 10_092_544)
    assert {t.name.split(".")[3] for t in plan.targets if t.group == "graft"} == {str(s) for s in GRAFTED}
    assert sum(t.group == "graft" for t in plan.targets) == 4
    # Negative control: the hand count is sensitive to the rank and the recipe to seam_width.
    assert hand_count(rank=8)[1] != plan.lora_parameters
    assert len(full_size_plan(e6b_headers, tmp_path, seam_width=1).targets) < len(plan.targets)
    assert plan.protection is None and plan.protection_note == "protect: false"  # the recipe's default
    protected = full_size_plan(e6b_headers, tmp_path, protect=True)
    assert protected.protection is None and "absent.safetensors is absent" in protected.protection_note


def test_full_size_e6b_memory_is_positive_and_ordered(e6b_headers, tmp_path):
    plan = full_size_plan(e6b_headers, tmp_path)
    totals = {(stage, world): sum(plan.memory(stage, world).values()) for stage in STAGES for world in (1, 2, 8)}
    assert all(value > 0 for stage in STAGES for value in plan.memory(stage, 2).values() if value is not None)
    for world in (2, 8):
        assert totals["ZeRO-3", world] < totals["ZeRO-2", world]
    assert totals["ZeRO-3", 8] < totals["ZeRO-3", 2] < totals["ZeRO-3", 1]
    assert plan.memory("ZeRO-2", 8)["weights"] == plan.memory("ZeRO-2", 1)["weights"] == plan.shape.parameters * 2
    # ZeRO-3 gathers the whole PLE table (262144 x 66·256) for its forward, whatever the world size.
    assert plan.shape.largest_module_parameters == 262144 * 66 * 256
    unchecked = full_size_plan(e6b_headers, tmp_path, activation_checkpointing=False)
    assert unchecked.memory("ZeRO-2", 8)["activations"] > 5 * plan.memory("ZeRO-2", 8)["activations"]
    distill = full_size_plan(e6b_headers, tmp_path, recipe="heal-distill.yaml")
    assert distill.distill is not None and distill.distill.teacher.parameters < plan.shape.parameters
    assert sum(distill.memory("ZeRO-3", 8).values()) > totals["ZeRO-3", 8]


def test_cli_prints_targets_memory_and_a_verdict_per_config(e6b_headers, tmp_path, capsys):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text((REPO / "recipes" / "heal.yaml").read_text().replace("out/gemma-4-E6B-it-raw", str(e6b_headers)))
    assert main([str(recipe), "--world-size", "2", "8"]) == 0
    out = capsys.readouterr().out
    assert "76 modules, 10,092,544 trainable parameters" in out and "Protection: none (protect: false)" in out
    assert out.count("fits on 80 GB") == 4 and "ZeRO-3 x8" in out and "ZeRO-2 x1:" not in out
    # Negative control: the same configs on 20 GB GPUs do not all fit.
    assert main([str(recipe), "--world-size", "2", "8", "--gpu-memory-gb", "20"]) == 0
    assert "ZeRO-2 x2" in (out := capsys.readouterr().out) and "does not fit on 20 GB" in out


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("plan-data") / "chat.jsonl", rows_for("messages", 4))


def source_weight(manifest: StackManifest, module: str) -> str:
    """'model.language_model.layers.17.mlp.up_proj' -> the source layer's weight name, through stack.json."""
    prefix = manifest.layer_prefix
    slot, suffix = module[len(prefix):].split(".", 1)
    return f"{prefix}{manifest.slots[int(slot)].source_layer}.{suffix}.weight"


def tiny_plan(tiny_e6b, fisher, chat, tmp_path, **overrides):
    heal, sft = load_config(heal_recipe(tmp_path / "heal.yaml", tiny_e6b, fisher, chat, tmp_path / "out", **overrides))
    return build_heal_plan(heal, sft, device="cpu")


def test_protection_is_heal_trains_from_the_targets_fisher_alone(tiny_e6b, e4b_fisher, chat, tmp_path):
    plan = tiny_plan(tiny_e6b, e4b_fisher, chat, tmp_path)
    manifest = load_manifest(tiny_e6b)
    names = [t.name for t in plan.targets]
    reference = plan_protection(slot_fisher(load_file(e4b_fisher), manifest), names, 0.5, 0.25)
    assert plan.protection.plan.keys() == reference.keys() and reference
    for name, protection in reference.items():
        assert torch.equal(plan.protection.plan[name].inputs, protection.inputs), name
        assert torch.equal(plan.protection.plan[name].outputs, protection.outputs), name
    # The same plan from a Fisher file holding only the tensors the targets map to: nothing else is read.
    fisher = load_file(e4b_fisher)
    needed = {name: fisher[name] for name in map(lambda module: source_weight(manifest, module), reference)}
    assert 0 < len(needed) < len(fisher)
    save_file(needed, tmp_path / "needed.safetensors", metadata=fisher_metadata(e4b_fisher))
    only_needed = tiny_plan(tiny_e6b, tmp_path / "needed.safetensors", chat, tmp_path)
    assert all(torch.equal(only_needed.protection.plan[n].inputs, p.inputs) for n, p in reference.items())
    printed = format_plan(plan, (1,), 80)
    assert f"Protection ({len(reference)} of {len(names)} targets" in printed and "total (mass-weighted)" in printed
    assert "layers.32.self_attn.k_proj: unprotected (no source Fisher)" in printed


def test_a_fisher_of_another_shape_is_refused_with_its_name(tiny_e6b, e4b_fisher, chat, tmp_path):
    fisher = load_file(e4b_fisher)
    name = "model.language_model.layers.10.mlp.up_proj.weight"  # the source layer of slot 18 (a seam slot)
    fisher[name] = fisher[name][:, :-1].contiguous()
    save_file(fisher, tmp_path / "bad.safetensors", metadata=fisher_metadata(e4b_fisher))
    with pytest.raises(ProtectionError, match=rf"{name}.*shape"):
        tiny_plan(tiny_e6b, tmp_path / "bad.safetensors", chat, tmp_path)


def test_the_plan_refuses_a_fisher_the_heal_would_refuse(tiny_e6b, e4b_fisher, chat, tmp_path):
    """The same checks as heal/train.py (fisher/file.py and the provenance check), so --plan never prints a plan
    for a Fisher the heal rejects. Control: the untouched file plans (test above)."""
    fisher, metadata = load_file(e4b_fisher), fisher_metadata(e4b_fisher)
    name = "model.language_model.layers.10.mlp.up_proj.weight"  # mapped to a seam slot
    fisher[name] = fisher[name].clone()
    fisher[name][0, 0] = -1.0
    save_file(fisher, tmp_path / "negative.safetensors", metadata=metadata)
    with pytest.raises(FisherFileError, match=rf"{name}.*negative"):
        tiny_plan(tiny_e6b, tmp_path / "negative.safetensors", chat, tmp_path)
    other = json.loads(metadata["fisher"])
    other["model_shard_sha256"] = {shard: "0" * 64 for shard in other["model_shard_sha256"]}
    save_file(load_file(e4b_fisher), tmp_path / "other.safetensors",
              metadata={**metadata, "fisher": json.dumps(other)})
    with pytest.raises(ProtectionError, match="shard"):
        tiny_plan(tiny_e6b, tmp_path / "other.safetensors", chat, tmp_path)


def fisher_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


def saved_activation_bytes(stack, targets: list[str], batch: int, length: int) -> int:
    """Bytes autograd saves for the backward in one forward of the LoRA'd backbone (parameters excluded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(stack, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=targets))
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    input_ids = torch.randint(8, 500, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.get_base_model().model(input_ids=input_ids)
    return sum(saved.values())


def test_activation_formula_matches_what_autograd_saves(tiny_e6b, chat, tmp_path):
    plan = tiny_plan(tiny_e6b, None, chat, tmp_path, protect=False, per_device_train_batch_size=2, max_length=64)
    measured = saved_activation_bytes(tiny_e6b, [t.name for t in plan.targets], batch=2, length=64)
    estimated = activation_bytes(plan.shape, target_layers(plan.targets), plan.work)
    assert abs(estimated / measured - 1) < 0.15, (estimated / GB, measured / GB)
    # Negative control: counting every layer, as if the layers below the first LoRA target saved activations too.
    every_layer = activation_bytes(plan.shape, target_layers(plan.targets) | {0}, plan.work)
    assert abs(every_layer / measured - 1) > 0.15


def test_train_py_plan_flag_prints_the_plan_and_loads_nothing(e6b_headers, tmp_path, capsys):
    from heal.train import main as train_main

    recipe = tmp_path / "heal.yaml"
    recipe.write_text((REPO / "recipes" / "heal.yaml").read_text().replace("out/gemma-4-E6B-it-raw", str(e6b_headers)))
    assert train_main([str(recipe), "--plan", "--world-size", "8"]) == 0  # the full-size stack has no weights at all
    out = capsys.readouterr().out
    assert "76 modules, 10,092,544 trainable parameters" in out and "ZeRO-3 x8" in out and "ZeRO-2 x1" not in out
    with pytest.raises(SystemExit):  # heal.plan's options are accepted only with --plan
        train_main([str(recipe), "--world-size", "8"])
