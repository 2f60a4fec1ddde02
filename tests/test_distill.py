"""objective: distill (heal/distill.py): the chunked KL against the unchunked reference, a teacher equal
to the student gives zero loss and gradient, alpha = 0 is plain SFT, and the run trains, saves and merges
with the protection composed. The ZeRO-2/3 runs with a teacher are in test_heal_distributed.py.
objective: onpolicy: the KL is taken on the student's own samples (with a negative control), lmbda 0 is the
teacher-forced distillation, a heal runs end to end, a resumed heal equals the uninterrupted one, and bad settings
are errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from core.logits import LogitHead
from heal.config import HealConfig, HealConfigError, load_config
from heal.distill import (
    DistillationTrainer,
    OnPolicyDistillationTrainer,
    TeacherError,
    chunked_kl_sum,
    completion_batch,
    cut_at_stop,
    load_teacher,
    prompt_tokens,
    token_kl,
)
from heal.train import main
from stack.tiny import save_tiny_decoder

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


def make_trainer(stack, teacher, data, folder, objective: str = "distill", **heal_overrides):
    """One trainer on the tiny stack (LoRA, no protection) and its first batch: objective onpolicy, or distill
    (teacher-forced); `heal_overrides` replace HealConfig keys of the recipe (onpolicy_lmbda ...)."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    heal, sft = load_config(heal_recipe(folder / "r.yaml", stack, None, data, folder / "out", protect=False,
                                        objective=objective, **heal_overrides))
    torch.manual_seed(0)
    kwargs = dict(
        teacher=load_teacher(str(teacher), torch.float32), heal=heal,
        model=AutoModelForCausalLM.from_pretrained(stack, dtype=torch.float32), args=sft,
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(stack),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    trainer_class = OnPolicyDistillationTrainer if objective == "onpolicy" else DistillationTrainer
    trainer = trainer_class(**kwargs)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; the loss normalizers read it
    return trainer, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def one_step_loss_and_lora_grads(stack, teacher, chat, tmp_path):
    trainer, inputs = make_trainer(stack, teacher, chat, tmp_path)
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


def test_a_student_that_differs_from_the_teacher_gets_loss_and_gradient(identity_and_rewind, tiny_llama, chat,
                                                                          tmp_path):
    _, rewind = identity_and_rewind  # 6 -> 8 layers: no longer the teacher's function
    loss, grads = one_step_loss_and_lora_grads(rewind, tiny_llama, chat, tmp_path)
    assert loss.item() > 1e-3
    assert any(torch.count_nonzero(g) > 0 for g in grads)


@pytest.fixture(scope="module")
def gemma3_text_rewind(tmp_path_factory):
    """A tiny 6-layer gemma3_text (sliding x5, full) and its rewind stack, which ends on the full-attention layer."""
    folder = tmp_path_factory.mktemp("gemma3-text")
    source = save_tiny_decoder(folder / "source", "gemma3_text", num_hidden_layers=6)
    assert run_stack(write_recipe(folder / "rw.yaml", [(0, 4), (2, 6)]), source, folder / "rewind") == 0
    return source, folder / "rewind"


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_cpt_on_text_rows_puts_the_loss_and_the_kl_on_every_token(gemma3_text_rewind, tmp_path, completion_only_loss):
    """Continued pretraining (the gemma3 study): plain {"text"} rows. Every token of a row is a label, the EOS TRL
    appends too, whatever completion_only_loss says (recipes/demo/heal.yaml sets it for the chat arms), and
    distill's KL (distill_tokens: loss) counts every position that predicts one of them."""
    source, stack = gemma3_text_rewind
    texts = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13 w14 w15 w16"]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in texts])
    trainer, inputs = make_trainer(stack, source, data, tmp_path, completion_only_loss=completion_only_loss,
                                   per_device_train_batch_size=3)
    real = inputs["attention_mask"].bool()  # [3, longest]: right padding
    assert sorted(real.sum(1).tolist()) == sorted(len(text.split()) + 1 for text in texts)  # + EOS
    assert torch.equal(inputs["labels"][real], inputs["input_ids"][real]) and (inputs["labels"][~real] == -100).all()
    assert torch.equal(trainer._positions(inputs), real[:, 1:])
    assert trainer.compute_loss(trainer.model, inputs).item() > 0


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
    sft_adapter = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    distill_adapter = load_file(tmp_path / "d" / "adapter_model.safetensors")
    assert sft_adapter.keys() == distill_adapter.keys()
    for name in sft_adapter:
        assert torch.equal(sft_adapter[name], distill_adapter[name]), name


def test_distill_from_the_stack_source_trains_saves_merges_and_keeps_the_protection(tiny_e6b, e4b_fisher, chat,
                                                                                     tmp_path, caplog):
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
    recipe = heal_recipe(tmp_path / "d.yaml", tiny_e6b, None, chat, tmp_path / "out", protect=False,
                         objective="distill", teacher=str(teacher))
    assert main([str(recipe)]) == 2
    assert "another tokenizer" in caplog.text and "<extra>" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_missing_teacher_checkpoint_is_an_error(tiny_e6b, chat, tmp_path, caplog):
    recipe = heal_recipe(tmp_path / "d.yaml", tiny_e6b, None, chat, tmp_path / "out", protect=False,
                         objective="distill", teacher=str(tmp_path / "no-such-model"))
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


# ---- objective: onpolicy (the KL on the student's own generations) -----------------------------------------


@pytest.fixture(scope="module")
def prompts_and_completions(tmp_path_factory):
    """Conversational prompt/completion rows: TRL's labels are -100 on the prompt, the prompt the student continues."""
    folder = tmp_path_factory.mktemp("onpolicy-data")
    return write_jsonl(folder / "pc.jsonl", rows_for("conversational_prompt_completion", 8))


STOPS = [1, 5]  # the tiny tokenizer's <eos> and <end_of_turn> (stack/tiny.py)


ONPOLICY_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def onpolicy_trainer(identity_and_rewind, tiny_llama, prompts_and_completions, tmp_path_factory):
    """lmbda 1, sampling at temperature 1 from the rewind stack (not the teacher's function)."""
    _, rewind = identity_and_rewind
    return make_trainer(rewind, tiny_llama, prompts_and_completions, tmp_path_factory.mktemp("onpolicy"), "onpolicy",
                        onpolicy_lmbda=1.0, onpolicy_max_new_tokens=ONPOLICY_NEW_TOKENS, onpolicy_temperature=1.0)


def kl_inputs_and_independent_samples(trainer, inputs, monkeypatch):
    """(the batch the KL was computed on and the loss per KL-counted position, each row's dataset prompt, the
    student's samples for the prompts drawn again here with the same torch RNG state, by a generate call written
    out independently of the trainer's)."""
    seen = []
    kl_sum = trainer._kl_sum
    monkeypatch.setattr(trainer, "_kl_sum", lambda batch: seen.append((batch, kl_sum(batch))) or seen[-1][1])
    rng = torch.get_rng_state()
    # The Trainer counts the data's label tokens; an on-policy batch is normalized by its own generated ones.
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=(inputs["labels"] != -100).sum())

    torch.set_rng_state(rng)
    starts = [int((row != -100).nonzero()[0]) for row in inputs["labels"]]
    prompts = [ids[:start] for ids, start in zip(inputs["input_ids"], starts)]
    width = max(starts)
    left_padded = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    trainer.model.eval()
    with torch.no_grad():
        output = trainer.model.generate(input_ids=left_padded, attention_mask=mask, max_new_tokens=ONPOLICY_NEW_TOKENS,
                                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=STOPS,
                                        pad_token_id=0)[:, width:]
    trainer.model.train()
    samples = []
    for row in output.tolist():
        stop = next((i for i, token in enumerate(row) if token in STOPS), len(row) - 1)
        samples.append(row[: stop + 1])
    (kl_batch, (kl, count, _)), = seen
    torch.testing.assert_close(loss, kl / count)
    return kl_batch, prompts, samples


def assert_kl_sees_the_students_samples(trainer, inputs, monkeypatch):
    kl_batch, prompts, samples = kl_inputs_and_independent_samples(trainer, inputs, monkeypatch)
    for row, (prompt, sample) in enumerate(zip(prompts, samples)):
        counted = kl_batch["labels"][row] != -100
        assert kl_batch["input_ids"][row, counted].tolist() == kl_batch["labels"][row, counted].tolist()
        assert kl_batch["input_ids"][row, : len(prompt)].tolist() == prompt.tolist(), f"row {row}: the prompt"
        assert kl_batch["labels"][row, counted].tolist() == sample, f"row {row}: the KL's tokens are not the student's"
        dataset_completion = inputs["labels"][row][inputs["labels"][row] != -100].tolist()
        assert sample != dataset_completion, f"row {row}: the sample equals the data; the test cannot tell them apart"


def test_onpolicy_kl_is_taken_on_the_students_own_samples(onpolicy_trainer, monkeypatch):
    trainer, inputs = onpolicy_trainer
    assert_kl_sees_the_students_samples(trainer, inputs, monkeypatch)
    metrics = trainer._metrics["train"]
    assert metrics["onpolicy_share"][-1] == 1.0 and 1 <= metrics["onpolicy_new_tokens"][-1] <= ONPOLICY_NEW_TOKENS
    assert metrics["distill_kl"][-1] > 0


def test_negative_control_a_trainer_on_the_datasets_tokens_fails_the_onpolicy_check(onpolicy_trainer, monkeypatch):
    trainer, inputs = onpolicy_trainer
    monkeypatch.setattr(trainer, "_student_batch", lambda model, inputs: inputs)  # the dataset's completions
    with pytest.raises(AssertionError, match="not the student's"):
        assert_kl_sees_the_students_samples(trainer, inputs, monkeypatch)


def test_onpolicy_with_lmbda_zero_is_the_teacher_forced_distillation(onpolicy_trainer, identity_and_rewind, tiny_llama,
                                                                     prompts_and_completions, tmp_path, monkeypatch):
    _, rewind = identity_and_rewind
    distill, inputs = make_trainer(rewind, tiny_llama, prompts_and_completions, tmp_path)
    onpolicy, _ = onpolicy_trainer
    monkeypatch.setattr(onpolicy, "heal", dataclasses.replace(onpolicy.heal, onpolicy_lmbda=0.0))
    losses_and_grads = []
    for trainer in (distill, onpolicy):
        loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=(inputs["labels"] != -100).sum())
        loss.backward()
        losses_and_grads.append((loss, [p.grad.clone() for n, p in trainer.model.named_parameters() if "lora_" in n]))
        trainer.model.zero_grad(set_to_none=True)
    (distill_loss, distill_grads), (onpolicy_loss, onpolicy_grads) = losses_and_grads
    assert distill_loss.item() > 1e-3
    torch.testing.assert_close(onpolicy_loss, distill_loss, rtol=0, atol=0)
    for distill_grad, onpolicy_grad in zip(distill_grads, onpolicy_grads, strict=True):
        torch.testing.assert_close(onpolicy_grad, distill_grad, rtol=0, atol=0)
    assert onpolicy._metrics["train"]["onpolicy_share"][-1] == 0.0


def test_completion_batch_keeps_the_stop_token_and_labels_only_the_completion():
    generated = torch.tensor([[7, 8, 5, 0, 0], [9, 9, 9, 9, 9]])  # row 0 stopped at <end_of_turn>, padded after it
    completions = [cut_at_stop(row, STOPS) for row in generated]
    assert [c.tolist() for c in completions] == [[7, 8, 5], [9, 9, 9, 9, 9]]
    batch = completion_batch([torch.tensor([4, 3, 6]), torch.tensor([4, 3])], completions, pad=0)
    assert batch["input_ids"].tolist() == [[4, 3, 6, 7, 8, 5, 0], [4, 3, 9, 9, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8, 5, -100], [-100, -100, 9, 9, 9, 9, 9]]


def test_a_row_without_a_prompt_is_an_error_naming_it():
    labelled_prompt = {"input_ids": torch.tensor([[4, 3, 6, 7]]), "labels": torch.tensor([[-100, -100, 6, 7]]),
                       "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert [p.tolist() for p in prompt_tokens(labelled_prompt)] == [[4, 3]]
    everything_labelled = {**labelled_prompt, "input_ids": torch.tensor([[4, 3, 6, 7], [4, 3, 6, 7]]),
                           "labels": torch.tensor([[-100, -100, 6, 7], [4, 3, 6, 7]]),
                           "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(TeacherError, match="row 1 .*assistant_only_loss"):
        prompt_tokens(everything_labelled)


def test_onpolicy_heals_end_to_end_adapters_train_and_the_stack_is_untouched(tiny_e6b, prompts_and_completions,
                                                                            tmp_path):
    """On the tiny E6B: generation through PEFT on Gemma-4's KV-shared layers, activation checkpointing switched
    off for generate and back on for the training step, which must still train every LoRA B. One step of three
    new tokens keeps it short (66 layers, a forward per generated token)."""
    shards = {path: path.read_bytes() for path in tiny_e6b.glob("*.safetensors")}
    recipe = heal_recipe(tmp_path / "op.yaml", tiny_e6b, None, prompts_and_completions, tmp_path / "out",
                         protect=False, merge=False, max_steps=1, activation_checkpointing=True, objective="onpolicy",
                         onpolicy_max_new_tokens=3)
    assert main([str(recipe)]) == 0
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "distill_kl" in entry]
    assert len(steps) == 1
    assert all(e["onpolicy_share"] == 1.0 and 1 <= e["onpolicy_new_tokens"] <= 3 for e in steps)
    assert all(e["distill_kl"] > 0 for e in steps)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)  # the base weights are not trained
    assert all(torch.count_nonzero(tensor) > 0 for name, tensor in adapter.items() if "lora_B" in name)  # B began at 0
    assert {path: path.read_bytes() for path in tiny_e6b.glob("*.safetensors")} == shards


@pytest.mark.parametrize("draws", ["seeded per step", "one stream"])
def test_an_onpolicy_heal_resumed_from_its_checkpoint_equals_the_uninterrupted_one(identity_and_rewind,
                                                                                   prompts_and_completions, tmp_path,
                                                                                   monkeypatch, draws):
    """Half the micro-batches on-policy (lmbda 0.5), sampled at temperature 1: a 4-step heal resumed from its own
    step-2 checkpoint draws the same micro-batches on-policy as it did, and samples the same completions (the Trainer
    restores the RNG), so the adapters are equal bit for bit. Negative control: draws from one seeded stream restart
    at the resumed step (steps 2-3 repeat steps 0-1's draws), and the two heals part."""
    if draws == "one stream":
        def stream_draw(self):
            stream = self.__dict__.setdefault("stream", random.Random(self.args.seed))
            return stream.random() < self.heal.onpolicy_lmbda
        monkeypatch.setattr(OnPolicyDistillationTrainer, "_draw_on_policy", stream_draw)
    _, rewind = identity_and_rewind
    common = dict(objective="onpolicy", onpolicy_lmbda=0.5, onpolicy_temperature=1.0, onpolicy_max_new_tokens=3,
                  lr_scheduler_type="constant", save_strategy="steps", save_steps=2, merge=False, protect=False)
    straight, resumed = (heal_recipe(tmp_path / f"{name}.yaml", rewind, None, prompts_and_completions, tmp_path / name,
                                     max_steps=4, **common) for name in ("straight", "resumed"))
    assert main([str(straight)]) == 0
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert main([str(resumed)]) == 0

    def on_policy_shares(folder):
        history = json.loads((tmp_path / folder / "trainer_state.json").read_text())["log_history"]
        return [entry["onpolicy_share"] for entry in history if "onpolicy_share" in entry]

    expected = load_file(tmp_path / "straight" / "checkpoint-4" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-4" / "adapter_model.safetensors")
    assert sorted(set(on_policy_shares("straight"))) == [0.0, 1.0]  # both kinds of micro-batch ran
    same = on_policy_shares("resumed") == on_policy_shares("straight") and all(
        torch.equal(resumed[name], expected[name]) for name in expected)
    assert same == (draws == "seeded per step"), (on_policy_shares("straight"), on_policy_shares("resumed"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"distill_alpha": 0.5}, "needs distill_alpha: 1.0, got 0.5"),
    ({"onpolicy_lmbda": 1.5}, "onpolicy_lmbda must be in \\[0, 1\\]"),
    ({"onpolicy_lmbda": -0.1}, "onpolicy_lmbda must be in \\[0, 1\\]"),
    ({"onpolicy_max_new_tokens": 0}, "onpolicy_max_new_tokens must be >= 1"),
    ({"onpolicy_temperature": -1.0}, "onpolicy_temperature must be >= 0"),
])
def test_onpolicy_config_errors(overrides, message):
    with pytest.raises(HealConfigError, match=message):
        HealConfig(stack="s", datasets=(), protect=False, objective="onpolicy", **overrides)
    if "distill_alpha" not in overrides:  # the on-policy fields are checked for objective: onpolicy only
        HealConfig(stack="s", datasets=(), protect=False, objective="distill", **overrides)


def test_onpolicy_under_zero3_is_refused_before_anything_loads():
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        with pytest.raises(TeacherError, match="unsupported under ZeRO-3 here; use ZeRO-2 or a single process"):
            OnPolicyDistillationTrainer(heal=HealConfig(stack="s", datasets=(), protect=False, objective="onpolicy"),
                                        teacher=None)
    finally:
        unset_hf_deepspeed_config()
        del zero3
