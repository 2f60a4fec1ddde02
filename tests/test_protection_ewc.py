"""The soft Fisher penalty (`protection: ewc`, heal/ewc.py): its value and gradient against a hand computation, λ = 0
against the plain heal bit for bit, its direction, activation checkpointing, and ZeRO-2/3 on two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from core.cards import CARD_NAME
from heal.config import HealConfig, HealConfigError
from heal.ewc import FisherPenalty
from heal.protection import PROTECTION_FILE, ProtectionError, load_protection, plan_ewc, slot_fisher
from heal.train import main
from stack.manifest import load_manifest

from .conftest import REPO, SEED_SOURCE_LAYERS, free_port, heal_recipe
from .fisher_support import rows_for, write_jsonl

LAYERS = "model.language_model.layers."
SEAM_SLOTS = (17, 18)  # slot 18 holds a second copy of L10, slot 17 holds L17
KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
TARGETS = [f"{LAYERS}{slot}.{kind}" for slot in SEAM_SLOTS for kind in KINDS]
GRAFTED_KV = f"{LAYERS}32.self_attn.k_proj"  # slot 32's k/v come from another layer: no source Fisher
# rank and alpha differ per module (PEFT's rank_pattern / alpha_pattern), so does the scale alpha / r
RANKS = {name: 2 + 2 * (i % 2) for i, name in enumerate(TARGETS)}
ALPHAS = {name: 3 + 5 * (i % 3) for i, name in enumerate(TARGETS)}
LAMBDA = 0.7


def heal_config(**fields) -> HealConfig:
    return HealConfig(stack="s", datasets=(), fisher="f.safetensors", protection="ewc", **fields)


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_lambda_must_be_finite_and_not_negative(value):
    with pytest.raises(HealConfigError, match="ewc_lambda must be a finite number >= 0"):
        heal_config(ewc_lambda=value)
    assert heal_config(ewc_lambda=0.0).ewc_lambda == 0.0


@pytest.fixture(scope="module")
def manifest(tiny_e6b):
    return load_manifest(tiny_e6b)


def test_targets_without_a_usable_fisher_are_a_named_error(source_fisher, manifest):
    with pytest.raises(ProtectionError, match=r"none of the 1 targeted module\(s\) has a source Fisher"):
        plan_ewc(slot_fisher(source_fisher, manifest), [GRAFTED_KV], 1.0)
    zero = {name: torch.zeros_like(values) for name, values in source_fisher.items()}
    with pytest.raises(ProtectionError, match="is zero everywhere, so it cannot be normalised"):
        plan_ewc(slot_fisher(zero, manifest), TARGETS, 1.0)


def lora_model(stack_dir):
    """The tiny stack with LoRA on TARGETS, A and B both random (PEFT's init would give B = 0, ΔW = 0)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stack_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                      rank_pattern={f"^{n}$": RANKS[n] for n in TARGETS},
                      alpha_pattern={f"^{n}$": ALPHAS[n] for n in TARGETS})
    return get_peft_model(model, lora).train()


def penalised(stack_dir, source_fisher, manifest):
    """lora_model with the penalty (λ = LAMBDA) attached, as HealTrainer attaches it."""
    model = lora_model(stack_dir)
    plan = plan_ewc(slot_fisher(source_fisher, manifest), TARGETS, LAMBDA)
    penalty = FisherPenalty(plan, {name: (0, 0) for name in plan}, heal_config(ewc_lambda=LAMBDA))
    penalty.attach(model)
    return model, penalty


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A [r, in], B [out, r])}, the live LoRA weights of TARGETS."""
    layers = {name: model.base_model.model.get_submodule(name) for name in TARGETS}
    return {name: (layer.lora_A["default"].weight, layer.lora_B["default"].weight) for name, layer in layers.items()}


def hand_penalty(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], source_fisher) -> torch.Tensor:
    """Σ over the modules of Σ F̃ (ΔW)², written out in float64: F of the slot's source layer (SEED_SOURCE_LAYERS),
    divided by the mean over every entry of every module in `lora`; ΔW = (alpha / r) · B A."""
    fisher = {}
    for name in lora:
        slot, kind = name.removeprefix(LAYERS).split(".", 1)
        fisher[name] = source_fisher[f"{LAYERS}{SEED_SOURCE_LAYERS[int(slot)]}.{kind}.weight"].double()
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
    total = torch.zeros((), dtype=torch.float64)
    for name, (lora_a, lora_b) in lora.items():
        delta = ALPHAS[name] / RANKS[name] * (lora_b.double() @ lora_a.double())
        total = total + (fisher[name] / mean * delta**2).sum()
    return total


def batch():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def penalised_step(model, penalty, ids):
    """HealTrainer.compute_loss's sequence on one micro-batch: the forward inside collecting, the objective plus the
    loss term, backward. Returns the penalty λ · P."""
    with penalty.collecting():
        objective = model(input_ids=ids, labels=ids).loss
    term, value = penalty.loss_term(1, objective.device)
    (objective + term).backward()
    return value


def test_the_penalty_and_its_gradient_equal_the_hand_computation(tiny_e6b, source_fisher, manifest):
    model, penalty = penalised(tiny_e6b, source_fisher, manifest)
    value = penalised_step(model, penalty, batch())
    hand = hand_penalty(lora_factors(model), source_fisher)
    assert hand > 0
    torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), LAMBDA * hand, rtol=1e-5, atol=0)

    # The gradient: with the penalty, minus the objective's alone, is λ ∂P/∂(A, B) by autograd on the hand formula.
    reference = lora_model(tiny_e6b)
    reference(input_ids=batch(), labels=batch()).loss.backward()
    leaves = {name: tuple(w.detach().double().requires_grad_() for w in pair)
              for name, pair in lora_factors(reference).items()}
    flat = [w for pair in leaves.values() for w in pair]
    hand_grads = dict(zip(map(id, flat), torch.autograd.grad(LAMBDA * hand_penalty(leaves, source_fisher), flat)))
    for name in TARGETS:
        for penalised_factor, objective_factor, leaf in zip(lora_factors(model)[name], lora_factors(reference)[name],
                                                            leaves[name]):
            torch.testing.assert_close((penalised_factor.grad - objective_factor.grad).double(), hand_grads[id(leaf)],
                                       rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_the_penalty_once(tiny_e6b, source_fisher, manifest, reentrant):
    """The checkpointed layers' forward runs again in the backward; the penalty and its gradient still count once
    (reentrant: ZeRO-3's mode, whose first forward runs without grad)."""
    plain, plain_penalty = penalised(tiny_e6b, source_fisher, manifest)
    plain_value = penalised_step(plain, plain_penalty, batch())
    model, penalty = penalised(tiny_e6b, source_fisher, manifest)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # as TRL does for PEFT with checkpointing
    forwards = []
    lora_b = model.base_model.model.get_submodule(TARGETS[0]).lora_B["default"]
    lora_b.register_forward_hook(lambda *args: forwards.append(1))
    value = penalised_step(model, penalty, batch())
    assert len(forwards) == 2, "the layer was not recomputed: checkpointing is off"
    assert value == plain_value
    for name in TARGETS:  # the penalty's share dominates these gradients: twice the penalty would be far off
        for checkpointed, reference in zip(lora_factors(model)[name], lora_factors(plain)[name]):
            error = (checkpointed.grad - reference.grad).abs().max() / reference.grad.abs().max()
            assert error < 1e-4, f"{name}: {error}"


# ---- the heal: heal/train.py with protection: ewc ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ewc-data") / "chat.jsonl", rows_for("messages", 8))


def heal(folder: Path, tiny_e6b, e4b_fisher, chat, **overrides) -> Path:
    """A 3-step heal (merge off) into folder/out; `overrides` replace recipe keys. Returns the output folder."""
    recipe = heal_recipe(folder / "r.yaml", tiny_e6b, e4b_fisher, chat, folder / "out", merge=False, **overrides)
    assert main([str(recipe)]) == 0
    return folder / "out"


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def logged(output_dir: Path, key: str) -> list[float]:
    return [entry[key] for entry in log_history(output_dir) if key in entry]


@pytest.fixture(scope="module")
def plain_heal(tiny_e6b, chat, tmp_path_factory) -> Path:
    return heal(tmp_path_factory.mktemp("plain"), tiny_e6b, None, chat, protect=False)


@pytest.fixture(scope="module")
def ewc_heals(tiny_e6b, e4b_fisher, chat, tmp_path_factory) -> dict[float, Path]:
    """The same heal at λ = 0 and λ = 30."""
    return {weight: heal(tmp_path_factory.mktemp(f"ewc-{weight}"), tiny_e6b, e4b_fisher, chat, protection="ewc",
                         ewc_lambda=weight)
            for weight in (0.0, 30.0)}


def test_zero_lambda_is_the_plain_heal_bit_for_bit(plain_heal, ewc_heals):
    plain, zero = (load_file(folder / "adapter_model.safetensors") for folder in (plain_heal, ewc_heals[0.0]))
    assert plain.keys() == zero.keys() and any(torch.count_nonzero(t) for n, t in plain.items() if "lora_B" in n)
    assert all(torch.equal(plain[name], zero[name]) for name in plain)
    assert logged(plain_heal, "loss") == logged(ewc_heals[0.0], "loss")
    assert logged(ewc_heals[0.0], "ewc_penalty") == [0.0, 0.0, 0.0]


def test_the_audit_file_records_the_kind_lambda_and_normalisation(ewc_heals, tiny_e6b, e4b_fisher):
    from safetensors import safe_open

    with safe_open(ewc_heals[30.0] / PROTECTION_FILE, "pt") as f:
        record = json.loads(f.metadata()["protection"])
        assert list(f.keys()) == []  # nothing to audit coordinate by coordinate: no guarantee, no bake
    assert record["kind"] == "ewc" and record["config"]["ewc_lambda"] == 30.0
    modules = record["modules"]
    fisher = slot_fisher(load_file(e4b_fisher), load_manifest(tiny_e6b))
    values = [fisher[f"{name}.weight"].double() for name in modules]
    mean = float(torch.cat([v.flatten() for v in values]).mean())
    assert all(entry["fisher_mean"] == pytest.approx(mean, rel=1e-9) for entry in modules.values())
    assert sum(entry["fisher_total"] for entry in modules.values()) == pytest.approx(sum(v.numel() for v in values))
    assert GRAFTED_KV not in modules and f"{LAYERS}18.mlp.up_proj" in modules
    assert load_protection(ewc_heals[30.0] / PROTECTION_FILE).keys() == modules.keys()
    card = (ewc_heals[30.0] / CARD_NAME).read_text()
    assert "Soft Fisher penalty" in card and "ewc_lambda 30.0" in card
    assert "| seam | 36 of 36 |" in card and "| graft | 0 of 4 |" in card  # grafted K/V: no source Fisher


def test_resume_refuses_a_checkpoint_of_another_kind_or_lambda(tiny_e6b, e4b_fisher, chat, tmp_path, caplog):
    out = heal(tmp_path, tiny_e6b, e4b_fisher, chat, protection="ewc", ewc_lambda=30.0, max_steps=2,
               save_strategy="steps", save_steps=2)
    for overrides, why in (({"protection": "coordinates"}, "with protection: ewc, this run with protection: "
                                                           "coordinates"),
                           ({"protection": "ewc", "ewc_lambda": 3.0}, "the protected penalty weights of")):
        recipe = heal_recipe(tmp_path / "again.yaml", tiny_e6b, e4b_fisher, chat, out, merge=False, max_steps=3,
                             **overrides)
        assert main([str(recipe)]) == 2
        assert f"cannot resume from {out / 'checkpoint-2'}" in caplog.text and why in caplog.text


def fisher_weighted_change(output_dir: Path, tiny_e6b, e4b_fisher) -> float:
    """Σ F̃ ΔW² of a saved adapter, from the Fisher file and the audit file's modules and normalisation."""
    from peft import PeftConfig

    adapter = load_file(output_dir / "adapter_model.safetensors")
    config = PeftConfig.from_pretrained(output_dir)
    fisher = slot_fisher(load_file(e4b_fisher), load_manifest(tiny_e6b))
    total = 0.0
    for name, entry in json.loads(_metadata(output_dir / PROTECTION_FILE))["modules"].items():
        pattern = f"^{name}$"
        scale = config.alpha_pattern.get(pattern, config.lora_alpha) / config.rank_pattern.get(pattern, config.r)
        lora_a, lora_b = (adapter[f"base_model.model.{name}.lora_{side}.weight"].double() for side in "AB")
        total += float((fisher[f"{name}.weight"].double() / entry["fisher_mean"] * (scale * lora_b @ lora_a) ** 2)
                       .sum())
    return total


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()["protection"]


def test_a_positive_lambda_moves_high_fisher_entries_less(ewc_heals, tiny_e6b, e4b_fisher):
    free, penalised_change = (fisher_weighted_change(ewc_heals[w], tiny_e6b, e4b_fisher) for w in (0.0, 30.0))
    assert 0 < penalised_change < 0.5 * free
    # The logged penalty is λ · Σ F̃ ΔW² of the weights each step's forward saw: 0 at step 1 (B = 0), then > 0.
    penalties = logged(ewc_heals[30.0], "ewc_penalty")
    assert penalties[0] == 0 and all(p > 0 for p in penalties[1:])


def test_activation_checkpointing_logs_the_same_penalty(ewc_heals, tiny_e6b, e4b_fisher, chat, tmp_path):
    checkpointed = heal(tmp_path, tiny_e6b, e4b_fisher, chat, protection="ewc", ewc_lambda=30.0,
                        activation_checkpointing=True)
    torch.testing.assert_close(torch.tensor(logged(checkpointed, "ewc_penalty")),
                               torch.tensor(logged(ewc_heals[30.0], "ewc_penalty")), rtol=1e-5, atol=0)


def test_the_plan_shows_the_penalty_and_the_memory_of_its_fisher(ewc_heals, tiny_e6b, e4b_fisher, chat, tmp_path):
    from heal.config import load_config
    from heal.plan import build_heal_plan, format_plan

    recipe = heal_recipe(tmp_path / "r.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "o", protection="ewc",
                         ewc_lambda=30.0)
    plan = build_heal_plan(*load_config(recipe), device="cpu")
    recorded = load_protection(ewc_heals[30.0] / PROTECTION_FILE)  # what the heal itself planned
    assert plan.protection.plan.keys() == recorded.keys()
    assert all(plan.protection.plan[name].difference(entry) is None for name, entry in recorded.items())
    entries = sum(plan.protection.plan[name].fisher.numel() for name in recorded)
    assert plan.memory("ZeRO-3", 2)["Fisher penalty F̃ (ewc)"] == 4 * entries  # fp32: bf16 is off in the recipe
    printed = format_plan(plan, (1,), 80)
    assert f"Fisher penalty (protection: ewc, ewc_lambda 30.0) on {len(recorded)} of {len(plan.targets)}" in printed
    assert "layers.32.self_attn.k_proj: not penalised (no source Fisher)" in printed


# ---- DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes over gloo (as tests/test_heal_distributed.py) ------------------

GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def same_rows(tmp_path_factory):
    """Every row the same conversation: batches are identical whatever the samplers' order."""
    return write_jsonl(tmp_path_factory.mktemp("ewc-same-rows") / "chat.jsonl", rows_for("messages", 1) * 8)


def distributed_recipe(folder: Path, tiny_e6b, e4b_fisher, chat, **overrides) -> Path:
    """3 steps of SGD: step 1's penalty has zero gradient (B = 0); step 2's moves the weights step 3 logs, in
    proportion (AdamW's update would hardly show the gradient's scale: with this penalty counted twice or not at
    all, step 3 logs 4.7 or 1.9 times the penalty)."""
    return heal_recipe(folder / "r.yaml", tiny_e6b, e4b_fisher, chat, folder / "out",
                       **{"max_steps": 3, "merge": False, "protection": "ewc", "ewc_lambda": 1.0, "optim": "sgd",
                          **overrides})


@pytest.fixture(scope="module")
def single_process_ewc(tiny_e6b, e4b_fisher, same_rows, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ewc-single")
    recipe = distributed_recipe(folder, tiny_e6b, e4b_fisher, same_rows, per_device_train_batch_size=GLOBAL_BATCH)
    assert main([str(recipe)]) == 0
    return folder / "out"


def test_gradient_accumulation_pays_the_penalty_once_per_step(single_process_ewc, tiny_e6b, e4b_fisher, same_rows,
                                                              tmp_path):
    """Two micro-batches of 2 per step against one of 4: each micro-batch adds its share (Trainer.training_step
    divides the loss, or the loss is already scaled by num_items_in_batch and the penalty is divided here)."""
    recipe = distributed_recipe(tmp_path, tiny_e6b, e4b_fisher, same_rows,
                                per_device_train_batch_size=GLOBAL_BATCH // 2, gradient_accumulation_steps=2)
    assert main([str(recipe)]) == 0
    for key in ("loss", "ewc_penalty"):
        torch.testing.assert_close(torch.tensor(logged(tmp_path / "out", key)),
                                   torch.tensor(logged(single_process_ewc, key)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("scaled_for_ga, accepts_loss_kwargs, num_items, divisor",
                         [(None, True, 7, 4), (None, True, None, 1), (None, False, 7, 1), (True, False, None, 4),
                          (False, True, 7, 1)])
def test_the_accumulation_divisor_follows_the_trainers_own_scaling(scaled_for_ga, accepts_loss_kwargs, num_items,
                                                                    divisor):
    """The rule of Trainer.training_step (the heal above takes the (None, False) row: Gemma-4 accepts no loss
    kwargs, so the Trainer divides the loss and the penalty is added whole)."""
    from types import SimpleNamespace

    from heal.trainer import HealTrainer

    trainer = SimpleNamespace(loss_is_scaled_for_ga=scaled_for_ga, model_accepts_loss_kwargs=accepts_loss_kwargs,
                              compute_loss_func=None, current_gradient_accumulation_steps=4)
    assert HealTrainer.accumulation_divisor(trainer, num_items) == divisor


def partition_everything(folder: Path, stage: int) -> Path:
    """recipes/accelerate/zero{stage}.yaml with its DeepSpeed file's stage3_param_persistence_threshold at 0."""
    import yaml

    config = yaml.safe_load((REPO / "recipes" / "accelerate" / f"zero{stage}.yaml").read_text())
    deepspeed = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
    deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (folder / "ds.json").write_text(json.dumps(deepspeed))
    config["deepspeed_config"]["deepspeed_config_file"] = str(folder / "ds.json")
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return folder / "accelerate.yaml"


REENTRANT = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}


# Both in the opt-in `make test-slow` (as tests/test_heal_distributed.py's ZeRO-2 and its kfac and distill ZeRO-3):
# 145 s for ZeRO-3 alone, and `make test` must stay under 15 minutes on 2 cores.
@pytest.mark.parametrize("stage, checkpointing", [pytest.param(2, {}, marks=pytest.mark.slow),
                                                  pytest.param(3, REENTRANT, marks=pytest.mark.slow)],
                         ids=["zero2", "zero3-reentrant"])
def test_zero_on_two_processes_matches_one(stage, checkpointing, single_process_ewc, tiny_e6b, e4b_fisher, same_rows,
                                            tmp_path):
    """ZeRO-3 partitions A and B outside their module's forward (every parameter here: the tiny LoRA factors are
    below the default persistence threshold, which would keep them whole), and with reentrant activation
    checkpointing (what TRL means PEFT + ZeRO-3 to use) the first forward runs without grad: the penalty and the
    losses still match one process."""
    recipe = distributed_recipe(tmp_path, tiny_e6b, e4b_fisher, same_rows, use_cpu=False,
                                per_device_train_batch_size=GLOBAL_BATCH // 2, **checkpointing)
    command = [str(Path(sys.executable).parent / "accelerate"), "launch",
               "--config_file", str(partition_everything(tmp_path, stage)),
               "--num_processes", "2", "--main_process_port", str(free_port()), "heal/train.py", str(recipe)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "DeepSpeed" in run.stdout + run.stderr

    out = tmp_path / "out"
    penalties = logged(out, "ewc_penalty")
    assert len(penalties) == 3 and penalties[1] > 0
    for key in ("loss", "ewc_penalty"):
        torch.testing.assert_close(torch.tensor(logged(out, key)), torch.tensor(logged(single_process_ewc, key)),
                                   rtol=2e-3, atol=0)
