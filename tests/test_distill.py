"""objective: distill (heal/distill.py): the chunked KL against the unchunked reference, a teacher equal
to the student gives zero loss and gradient, alpha = 0 is plain SFT, and the run trains, saves and merges
with the protection composed. The ZeRO-2/3 runs with a teacher are in test_heal_distributed.py."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from heal.distill import DistillationTrainer, DistillConfig, LogitHead, chunked_kl_sum, load_teacher, token_kl
from heal.train import main

from .checkpoints import assert_loads_clean, assert_protection_holds
from .conftest import heal_recipe, run_stack, write_recipe
from .fisher_support import rows_for, write_jsonl


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("distill-data") / "chat.jsonl", rows_for("messages", 8))


# ---- the chunked KL ----------------------------------------------------------------------------------------


def random_head(vocab: int, hidden: int, softcap: float | None, seed: int) -> LogitHead:
    weight = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return LogitHead(weight, None, softcap)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kl_and_its_gradient_equal_the_unchunked_reference(softcap, temperature):
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(37, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(37, 16, generator=generator, dtype=torch.float64)
    student_head, teacher_head = random_head(50, 16, softcap, 1), random_head(50, 16, softcap, 2)

    chunked = chunked_kl_sum(student_hidden, teacher_hidden, student_head, teacher_head, temperature, chunk_size=5)
    (chunked_grad,) = torch.autograd.grad(chunked, student_hidden)

    def logits(head, hidden):  # written out independently of LogitHead.logits
        z = hidden @ head.weight.T
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    reference = token_kl(logits(teacher_head, teacher_hidden), logits(student_head, student_hidden), temperature).sum()
    (reference_grad,) = torch.autograd.grad(reference, student_hidden)
    torch.testing.assert_close(chunked, reference.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grad, reference_grad, rtol=1e-5, atol=1e-6)


def test_token_kl_matches_a_hand_computed_value():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln(2) + 1/2 ln(2/3)
    teacher, student = torch.tensor([0.0, 0.0]), torch.tensor([0.0, torch.log(torch.tensor(3.0))])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    torch.testing.assert_close(token_kl(teacher, student), expected, rtol=1e-6, atol=0)


def test_a_trainable_student_head_is_refused():
    head = LogitHead(torch.zeros(4, 2, requires_grad=True), None, None)
    with pytest.raises(ValueError, match="lm_head"):
        chunked_kl_sum(torch.zeros(1, 2), torch.zeros(1, 2), head, head)


# ---- the trainer on an identity stack: teacher == student ----------------------------------------------------


def one_step_loss_and_lora_grads(stack, teacher, chat, tmp_path):
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heal.config import load_config

    _, sft = load_config(heal_recipe(tmp_path / "r.yaml", stack, None, chat, tmp_path / "out", protect=False))
    torch.manual_seed(0)
    trainer = DistillationTrainer(
        teacher=load_teacher(str(teacher), torch.float32), distill=DistillConfig(alpha=1.0),
        model=AutoModelForCausalLM.from_pretrained(stack, dtype=torch.float32), args=sft,
        train_dataset=load_dataset("json", data_files=str(chat), split="train"),
        processing_class=AutoTokenizer.from_pretrained(stack),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_" in n]
    return loss, grads


@pytest.fixture(scope="module")
def identity_and_rewind(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-stacks")
    assert run_stack(write_recipe(folder / "id.yaml", [(0, 6)]), tiny_llama, folder / "identity") == 0
    assert run_stack(write_recipe(folder / "rw.yaml", [(0, 4), (2, 6)]), tiny_llama, folder / "rewind") == 0
    return folder / "identity", folder / "rewind"


def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(identity_and_rewind, tiny_llama, chat, tmp_path):
    """LoRA's B starts at zero (PEFT's default), so the identity stack computes exactly the teacher's function."""
    identity, _ = identity_and_rewind
    loss, grads = one_step_loss_and_lora_grads(identity, tiny_llama, chat, tmp_path)
    assert loss.item() == 0.0
    assert grads and all(g is not None for g in grads)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_a_student_that_differs_from_the_teacher_gets_loss_and_gradient(identity_and_rewind, tiny_llama, chat, tmp_path):
    _, rewind = identity_and_rewind  # 6 -> 8 layers: no longer the teacher's function
    loss, grads = one_step_loss_and_lora_grads(rewind, tiny_llama, chat, tmp_path)
    assert loss.item() > 1e-3
    assert any(torch.count_nonzero(g) > 0 for g in grads)


# ---- through heal/train.py on the tiny E6B -----------------------------------------------------------------


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_alpha_zero_reproduces_sft_exactly(tiny_e6b, e4b_fisher, chat, tmp_path):
    sft = heal_recipe(tmp_path / "sft.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "sft", merge=False)
    distill = heal_recipe(tmp_path / "d.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "d", merge=False,
                          objective="distill", distill_alpha=0.0)
    assert main([str(sft)]) == 0 and main([str(distill)]) == 0
    assert losses(tmp_path / "sft") == losses(tmp_path / "d")
    sft_adapter, distill_adapter = load_file(tmp_path / "sft" / "adapter_model.safetensors"), load_file(tmp_path / "d" / "adapter_model.safetensors")
    assert sft_adapter.keys() == distill_adapter.keys()
    for name in sft_adapter:
        assert torch.equal(sft_adapter[name], distill_adapter[name]), name


def test_distill_from_the_stack_source_trains_saves_merges_and_keeps_the_protection(tiny_e6b, e4b_fisher, chat, tmp_path, caplog):
    recipe = heal_recipe(tmp_path / "d.yaml", tiny_e6b, e4b_fisher, chat, tmp_path / "out", objective="distill",
                         distill_alpha=0.5, distill_temperature=2.0, distill_tokens="all", distill_chunk_size=7)
    with caplog.at_level(logging.INFO):
        assert main([str(recipe)]) == 0
    source = json.loads((tiny_e6b / "stack.json").read_text())["source"]["model"]
    assert f"distilling from {source}" in caplog.text  # the teacher defaults to stack.json's source model
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    kl = [entry["distill_kl"] for entry in history if "distill_kl" in entry]
    assert len(kl) == 3 and all(value > 0 for value in kl)

    assert_loads_clean(tmp_path / "out" / "merged")
    assert_protection_holds(tiny_e6b, tmp_path / "out")


# ---- errors ------------------------------------------------------------------------------------------------


def test_a_teacher_with_another_tokenizer_is_an_error(tiny_e6b, tiny_e4b, chat, tmp_path, caplog):
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_e4b, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(teacher)
    recipe = heal_recipe(tmp_path / "d.yaml", tiny_e6b, None, chat, tmp_path / "out", protect=False, objective="distill",
                         teacher=str(teacher))
    assert main([str(recipe)]) == 2
    assert "another tokenizer" in caplog.text and "<extra>" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_missing_teacher_checkpoint_is_an_error(tiny_e6b, chat, tmp_path, caplog):
    recipe = heal_recipe(tmp_path / "d.yaml", tiny_e6b, None, chat, tmp_path / "out", protect=False, objective="distill",
                         teacher=str(tmp_path / "no-such-model"))
    assert main([str(recipe)]) == 2
    assert "no-such-model" in caplog.text and "missing" in caplog.text


def test_a_stack_whose_source_is_gone_names_stack_json(tiny_e6b, chat, tmp_path, caplog):
    stack = tmp_path / "stack"
    shutil.copytree(tiny_e6b, stack)
    manifest = json.loads((stack / "stack.json").read_text())
    manifest["source"]["model"] = str(tmp_path / "moved-away")
    (stack / "stack.json").write_text(json.dumps(manifest))
    recipe = heal_recipe(tmp_path / "d.yaml", stack, None, chat, tmp_path / "out", protect=False, objective="distill")
    assert main([str(recipe)]) == 2
    assert "moved-away" in caplog.text and "stack.json" in caplog.text
