"""evaluation/: the metrics on hand-made sequences, each model-based measurement against an independent
computation with the same tiny random Llama (the chunked KL and NLL also against float64 on a 262,144-token
vocabulary), the generation's two continuation kinds against plain `generate`, the report end to end, and the
CLI's errors."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil

import pytest
import torch
import yaml
from tokenizers import processors
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core.logits import LogitHead
from core.tokens import stop_token_ids
from evaluation import ifeval
from evaluation.__main__ import main
from evaluation.config import EvalConfig, EvalError, resolve_device, resolve_dtype
from evaluation.generation import greedy_continuations
from evaluation.inputs import load_instruct, load_prompts, prompt_ids
from evaluation.likelihood import (
    Backbone,
    ResponseExample,
    chunked_token_kl,
    encode_response_examples,
    encode_texts,
    kl_rows,
    nll_rows,
    ratio,
    reference_states,
    response_mask,
)
from evaluation.lm_eval_tasks import lm_eval_items
from evaluation.metrics import distinct_n, ends_in_loop, seq_rep_n
from evaluation.report import plot_metrics, write_report
from evaluation.run import evaluate_models
from heal.distill import token_kl
from stack.tiny import CHAT_TEMPLATE, save_tiny_decoder, save_tiny_tokenizer

from .fisher_support import rows_for, words, write_jsonl

TASK = "tiny_evaluate_mc"


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("eval-a"), "llama", num_hidden_layers=2, seed=0)


@pytest.fixture(scope="module")
def tiny_b(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("eval-b"), "llama", num_hidden_layers=2, seed=1)


@pytest.fixture(scope="module")
def model_a(tiny_a):
    return AutoModelForCausalLM.from_pretrained(tiny_a, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model_b(tiny_b):
    return AutoModelForCausalLM.from_pretrained(tiny_b, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_a):
    return AutoTokenizer.from_pretrained(tiny_a)


@pytest.fixture(scope="module")
def chat_rows():
    return [row["messages"] for row in rows_for("messages", 5)]  # 4 messages each, the last the assistant's


def user_prompts(count: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": words(rng, rng.randint(1, 9))}] for _ in range(count)]


def template_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    """The chat template's tokens, straight from the tokenizer (the template writes any special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# Pure metrics


def test_seq_rep_n():
    # [1,2,3,4]×3: 12 − 4 + 1 = 9 four-grams, of which 4 distinct ((1,2,3,4), (2,3,4,1), (3,4,1,2), (4,1,2,3)),
    # so 1 − 4/9 = 5/9.
    assert seq_rep_n([1, 2, 3, 4] * 3, 4) == pytest.approx(5 / 9)
    # [7]×6: 3 four-grams, 1 distinct -> 2/3.
    assert seq_rep_n([7] * 6, 4) == pytest.approx(2 / 3)
    assert seq_rep_n(list(range(20)), 4) == 0.0
    assert seq_rep_n([1, 1, 1], 4) == 0.0  # fewer than n tokens
    assert seq_rep_n([], 4) == 0.0


def test_ends_in_loop():
    looping = [10, 11, 12, 13, 14, 15] + [1, 2] * 8  # ends in 16 tokens of period 2 (≥ max(3·2, 12) = 12)
    assert ends_in_loop(looping, stopped=False)
    assert not ends_in_loop(looping, stopped=True)  # it stopped by itself: not a loop
    assert not ends_in_loop(list(range(40)), stopped=False)  # no period in the tail
    assert not ends_in_loop([1, 2] * 10 + [3, 4, 5], stopped=False)  # the loop ended before the end
    assert not ends_in_loop([1, 2] * 5, stopped=False)  # 10 tokens < min_tail 12
    assert ends_in_loop([3] * 12, stopped=False)  # period 1
    # Period 5 over the last 20 tokens (L = max(3·5, 12) = 15): found only when max_period reaches 5.
    period_five = [9, 8] + [1, 2, 3, 4, 5] * 4
    assert not ends_in_loop(period_five, stopped=False, max_period=4)
    assert ends_in_loop(period_five, stopped=False, max_period=5)
    # min_repeats: period 5 needs 3·5 = 15 periodic tokens; 10 are not enough (min_tail lowered to 1).
    assert not ends_in_loop([99, 6, 5, 4, 3] + [7, 6, 5, 4, 3] * 2, stopped=False, min_tail=1)
    assert ends_in_loop([7, 6, 5, 4, 3] * 3, stopped=False, min_tail=1)


def test_distinct_n():
    # Bigrams (1,2), (2,3), (1,2), (2,4): 3 distinct of 4. Pooled over the corpus (each sequence alone is 1.0).
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 0.75
    assert distinct_n([[5, 5, 5, 5]], 2) == 1 / 3
    assert distinct_n([[1], []], 2) == 0.0


# ---------------------------------------------------------------------------------------------------
# KL to the reference


def mean_kl(model, reference, tokenizer, rows, batch_size: int = 8, chunk_size: int = 256) -> float:
    """Token-weighted KL(reference ‖ model) over the rows' final assistant messages, the way evaluation.run does."""
    examples = encode_response_examples(tokenizer, rows)
    states = reference_states(reference, examples, tokenizer.pad_token_id, batch_size)
    return ratio(kl_rows(model, states, examples, tokenizer.pad_token_id, batch_size, chunk_size))


def test_kl_of_a_model_to_itself_is_exactly_zero(model_a, tokenizer, chat_rows):
    kl = mean_kl(Backbone(model_a), Backbone(model_a), tokenizer, chat_rows, batch_size=2)
    assert_close(torch.tensor(kl), torch.tensor(0.0), atol=0, rtol=0)


def identity_head(vocab: int) -> LogitHead:
    """An LM head that passes its "hidden states" through as the logits: hidden size = vocab."""
    return LogitHead(torch.eye(vocab), None, None)


def test_response_kl_by_hand():
    # Vocabulary of 2. Reference p = (1/2, 1/2), model q = (1/4, 3/4):
    # KL(p ‖ q) = ½ ln(½ / ¼) + ½ ln(½ / ¾) = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3); (1/2, 1/2) against itself: 0.
    reference = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))  # [2 positions, vocab 2], through identity heads
    model = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    kl = chunked_token_kl(model, reference, identity_head(2), identity_head(2), chunk_size=1)
    assert kl.tolist() == pytest.approx([0.5 * math.log(4 / 3), 0.0], rel=1e-6)


def test_response_mask_marks_the_positions_that_predict_the_response():
    # Row 0: 6 tokens, prompt 4 -> tokens 4, 5 are predicted at positions 3, 4. Row 1: 3 tokens, prompt 1, padded to 6.
    mask = response_mask([4, 1], [6, 3], width=6)
    assert mask.tolist() == [[False, False, False, True, True, False], [True, True, False, False, False, False]]


class ScriptedHidden:
    """A stand-in backbone whose final hidden states are a function of the input ids, [batch, seq] -> [batch, seq,
    vocab], read as logits by an identity head."""

    device = torch.device("cpu")

    def __init__(self, logits_for, vocab: int):
        self.logits_for, self.head = logits_for, identity_head(vocab)

    def hidden(self, input_ids, attention_mask):
        return self.logits_for(input_ids)


def test_kl_counts_only_the_final_assistant_messages_tokens(tokenizer, chat_rows):
    """The model equals the uniform reference exactly on the logit positions that predict the last assistant
    message, and is wildly different everywhere else (prompt, earlier assistant turns, padding): the KL must be
    0. Moving the difference onto one response position must make it count, with the hand-computed weight."""
    vocab = len(tokenizer)
    # Independent of evaluation/: where the final assistant message starts and ends, straight from the template.
    spans = []
    for messages in chat_rows:
        full = template_ids(tokenizer, messages)
        prompt = template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        spans.append((full, len(prompt)))
    by_ids = {tuple(full): prompt_length for full, prompt_length in spans}
    garbage = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 5

    def logits_outside_response(input_ids):
        logits = torch.zeros(*input_ids.shape, vocab)
        for row, ids in enumerate(input_ids.tolist()):
            length = next(n for n in range(len(ids), 0, -1) if tuple(ids[:n]) in by_ids)
            prompt_length = by_ids[tuple(ids[:length])]
            logits[row, : prompt_length - 1] = garbage  # positions predicting the prompt
            logits[row, length - 1 :] = garbage  # the last real token (predicts nothing) and the padding
        return logits

    uniform = ScriptedHidden(lambda input_ids: torch.zeros(*input_ids.shape, vocab), vocab)
    outside = ScriptedHidden(logits_outside_response, vocab)
    assert mean_kl(outside, uniform, tokenizer, chat_rows, batch_size=2) == 0.0

    def logits_on_first_response_position(input_ids):
        logits = logits_outside_response(input_ids)
        for row, ids in enumerate(input_ids.tolist()):
            length = next(n for n in range(len(ids), 0, -1) if tuple(ids[:n]) in by_ids)
            logits[row, by_ids[tuple(ids[:length])] - 1] = garbage
        return logits

    # KL(uniform ‖ softmax(garbage)) at one position per row, over all response tokens.
    log_uniform = torch.full((vocab,), -math.log(vocab))
    kl_one = (log_uniform.exp() * (log_uniform - torch.log_softmax(garbage, -1))).sum()
    response_tokens = sum(len(full) - prompt_length for full, prompt_length in spans)
    expected = kl_one.item() * len(chat_rows) / response_tokens
    kl = mean_kl(ScriptedHidden(logits_on_first_response_position, vocab), uniform, tokenizer, chat_rows, batch_size=2)
    assert kl == pytest.approx(expected, rel=1e-5)


def test_kl_matches_unpadded_rows_one_at_a_time(model_a, model_b, tokenizer, chat_rows):
    """Batched with right padding, sorted by length, chunked == each row alone, per row and token-weighted."""
    expected = []
    with torch.no_grad():
        for messages in chat_rows:
            prompt = template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
            full = torch.tensor([template_ids(tokenizer, messages)])
            positions = slice(len(prompt) - 1, full.shape[1] - 1)
            kl = token_kl(model_a(full).logits[0, positions], model_b(full).logits[0, positions])
            expected.append((kl.sum().item(), kl.numel()))
    examples = encode_response_examples(tokenizer, chat_rows)
    states = reference_states(Backbone(model_a), examples, tokenizer.pad_token_id, batch_size=3)
    rows = kl_rows(Backbone(model_b), states, examples, tokenizer.pad_token_id, batch_size=3, chunk_size=5)
    assert [count for _, count in rows] == [count for _, count in expected]
    assert_close(torch.tensor([total for total, _ in rows]), torch.tensor([total for total, _ in expected]),
                 rtol=1e-5, atol=1e-7)
    assert ratio(rows) > 0


def test_kl_of_text_rows_covers_every_token_after_the_first(model_a, model_b, tokenizer, chat_rows, tmp_path):
    """{"text"} rows of --instruct (a base model's held-out text, beside chat rows): KL(reference ‖ model) at every
    position that predicts a token, each row cut to max_length; batched and chunked equal each row's full logits."""
    texts = ["w1 w7 w300 w42 w42 w9", "w10 w11", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15"]
    path = write_jsonl(tmp_path / "kl.jsonl", [{"text": text, "work": "x"} for text in texts] +
                       [{"messages": chat_rows[0]}])
    rows = load_instruct(path)
    assert rows[:3] == texts and rows[3] == chat_rows[0]
    max_length = 8  # cuts the last row
    expected = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
            kl = token_kl(model_a(ids).logits[0, :-1], model_b(ids).logits[0, :-1])
            expected.append((kl.sum().item(), kl.numel()))
    assert [count for _, count in expected] == [5, 1, 7]
    examples = encode_response_examples(tokenizer, rows[:3], max_length=max_length)
    states = reference_states(Backbone(model_a), examples, tokenizer.pad_token_id, batch_size=2)
    for chunk_size in (3, 256):
        kl = kl_rows(Backbone(model_b), states, examples, tokenizer.pad_token_id, batch_size=2, chunk_size=chunk_size)
        assert [count for _, count in kl] == [count for _, count in expected]
        assert_close(torch.tensor([total for total, _ in kl]), torch.tensor([total for total, _ in expected]),
                     rtol=1e-5, atol=1e-7)
    with pytest.raises(EvalError, match="kl.jsonl row 1: fewer than two tokens"):
        encode_response_examples(tokenizer, ["w1 w2", "w3"], source="kl.jsonl")


def test_a_row_whose_prompt_is_not_a_prefix_is_named(tokenizer, chat_rows):
    odd = copy.deepcopy(tokenizer)
    # The full text gains a first token.
    odd.chat_template = "{% if not add_generation_prompt %}w9 {% endif %}" + CHAT_TEMPLATE
    with pytest.raises(EvalError, match=r"held-out row 0: .*not a prefix"):
        encode_response_examples(odd, chat_rows, source="held-out")


def test_a_row_without_a_final_assistant_message_is_named(tmp_path, chat_rows):
    rows = [{"messages": m} for m in chat_rows] + [{"messages": chat_rows[0][:-1]}]
    path = write_jsonl(tmp_path / "instruct.jsonl", rows)
    message = rf"{path.name} row {len(chat_rows)}: the last message must be the assistant's"
    with pytest.raises(EvalError, match=message):
        load_instruct(path)


# ---------------------------------------------------------------------------------------------------
# Perplexity


def perplexity(model, tokenizer, texts, max_length: int = 256, batch_size: int = 8, chunk_size: int = 256) -> float:
    rows = nll_rows(Backbone(model), encode_texts(tokenizer, texts, max_length), tokenizer.pad_token_id, batch_size,
                    chunk_size)
    return math.exp(ratio(rows))


def test_perplexity_of_one_row_is_exp_of_the_models_own_loss(model_a, tokenizer):
    text = "w1 w7 w300 w42 w42 w9 w100 w5"
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        loss = model_a(input_ids, labels=input_ids).loss  # mean NLL over the 7 predicted tokens
    assert_close(torch.tensor(perplexity(model_a, tokenizer, [text])), loss.exp(), rtol=1e-5, atol=0)


def test_perplexity_weights_rows_by_tokens_and_ignores_padding_and_truncated_tokens(model_a, tokenizer):
    texts = ["w1 w2 w3", "w10 w11 w12 w13 w14 w15 w16", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17"]
    max_length = 9  # cuts the last row to 9 tokens
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
            nll += model_a(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    batched = perplexity(model_a, tokenizer, texts, max_length=max_length, batch_size=3, chunk_size=4)
    assert_close(torch.tensor(batched), torch.tensor(math.exp(nll / count)), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------
# Greedy continuations


def generate_alone(model, tokenizer, messages, max_new_tokens, min_new_tokens: int = 0):
    """One prompt, no padding, straight model.generate (min_new_tokens: HF's own stop-token suppression); cut at the
    first stop token. Returns (tokens, stopped). A str prompt is plain text: the tokenizer's own encoding."""
    if isinstance(messages, str):
        ids = tokenizer(messages)["input_ids"]
    else:
        ids = template_ids(tokenizer, messages, add_generation_prompt=True)
    stops = [tokenizer.eos_token_id, tokenizer.get_vocab()["<end_of_turn>"]]
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    output = output[0, len(ids):].tolist()
    end = next((i for i, token in enumerate(output) if token in stops), None)
    return output[:end], end is not None


def test_stop_tokens_are_eos_and_end_of_turn(tokenizer):
    vocab = tokenizer.get_vocab()
    # Not <unk> for an absent <|im_end|>.
    assert stop_token_ids(tokenizer) == sorted([vocab["<eos>"], vocab["<end_of_turn>"]])


def test_greedy_batches_match_one_prompt_at_a_time(model_a, tokenizer):
    """Both kinds of continuation, from one run in length-sorted left-padded batches, equal plain `generate` on each
    prompt alone: natural-stop at the cap, and fixed-length with HF's min_new_tokens suppression."""
    prompts = user_prompts(5)  # 1 to 9 words: left padding differs from row to row
    cap, fixed = 10, 7
    generated = greedy_continuations(model_a, tokenizer, prompts, cap, fixed, batch_size=3)
    expected = [generate_alone(model_a, tokenizer, p, cap) for p in prompts]
    assert [(c.tokens, c.stopped) for c in generated.natural] == expected

    # Make a token that prompt 0 generates (its 4th) the EOS: that row stops there, its batch-mates go on. Its
    # fixed-length continuation goes on past it with the next-best token, as generate with min_new_tokens does.
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(generated.natural[0].tokens[3])
    stopped = greedy_continuations(model_a, stopping, prompts, cap, fixed, batch_size=3)
    expected = [generate_alone(model_a, stopping, p, cap) for p in prompts]
    assert [(c.tokens, c.stopped) for c in stopped.natural] == expected
    assert stopped.natural[0].stopped and len(stopped.natural[0].tokens) <= 3
    assert any(not c.stopped and len(c.tokens) == cap for c in stopped.natural)
    expected_fixed = [generate_alone(model_a, stopping, p, fixed, min_new_tokens=fixed)[0] for p in prompts]
    assert [c.tokens for c in stopped.fixed] == expected_fixed
    assert all(len(c.tokens) == fixed and not c.stopped for c in stopped.fixed)


def test_plain_text_prompts_are_continued_with_no_chat_template(model_a, tokenizer, tmp_path):
    """{"text"} rows of --prompts (a base model's prompts, beside chat rows): generation continues the tokenizer's
    plain encoding of the text, its BOS included, with no chat template around it."""
    with_bos = copy.deepcopy(tokenizer)  # a tokenizer that adds a BOS, as Gemma's does
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", with_bos.bos_token_id)])
    chat = [{"role": "user", "content": "w5 w6 w7"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "w5 w6 w7"}, {"text": "w8 w9", "work": "x"},
                                                    {"messages": chat}])
    prompts = load_prompts(path)
    assert prompts == ["w5 w6 w7", "w8 w9", chat]
    vocab = with_bos.get_vocab()
    assert prompt_ids(with_bos, prompts[0]) == [vocab["<bos>"], vocab["w5"], vocab["w6"], vocab["w7"]]
    assert prompt_ids(with_bos, chat) == template_ids(with_bos, chat, add_generation_prompt=True)
    generated = greedy_continuations(model_a, with_bos, prompts, 6, 0, batch_size=3)
    assert [(c.tokens, c.stopped) for c in generated.natural] == [generate_alone(model_a, with_bos, p, 6)
                                                                  for p in prompts]
    # The same words as a chat prompt are another input, so (here) another continuation.
    assert generated.natural[0].tokens != generated.natural[2].tokens


@pytest.fixture(scope="module")
def eager_to_stop(model_a, tokenizer):
    """model_a with a bias on its LM head that makes EOS, then <end_of_turn>, the greedy choice at every step."""
    model = copy.deepcopy(model_a)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    vocab = tokenizer.get_vocab()
    head.bias.data[vocab["<eos>"]], head.bias.data[vocab["<end_of_turn>"]] = 200.0, 100.0
    model.lm_head = head
    return model


def test_fixed_length_suppresses_every_stop_token_until_n(eager_to_stop, tokenizer):
    """A model that would stop at once still gives exactly N tokens, none of them a stop token; its natural-stop
    continuation is empty and stopped. N longer than the natural cap works too."""
    prompts = user_prompts(3)
    stops = set(stop_token_ids(tokenizer))
    for cap, fixed in ((8, 12), (16, 12)):
        generated = greedy_continuations(eager_to_stop, tokenizer, prompts, cap, fixed, batch_size=2)
        assert all(c.tokens == [] and c.stopped for c in generated.natural)
        assert all(len(c.tokens) == fixed and not stops & set(c.tokens) for c in generated.fixed)
    assert [c.tokens for c in generated.fixed] == [
        generate_alone(eager_to_stop, tokenizer, p, fixed, min_new_tokens=fixed)[0] for p in prompts]


# ---------------------------------------------------------------------------------------------------
# lm-eval-harness


def choice_loglikelihoods(model, tokenizer, question: str, choices: list[str]) -> list[float]:
    """Σ log p(choice tokens | question), lm-eval's way: the context, then " " + choice."""
    lls = []
    context = tokenizer(question)["input_ids"]
    for choice in choices:
        whole = tokenizer(question + " " + choice)["input_ids"]
        assert whole[: len(context)] == context  # word-level tokens: the split is clean
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        lls.append(sum(log_probs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    return lls


def write_mc_task(folder, rows) -> None:
    data = write_jsonl(folder / "mc.jsonl", rows)
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{question}}",
        "doc_to_target": "label", "doc_to_choice": "choices",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }))


@pytest.fixture(scope="module")
def mc_task(model_a, tokenizer, tmp_path_factory):
    """Six 3-way questions; the label is the by-hand argmax for 4 of them and a wrong choice for 2: acc = 4/6.
    Returns (tasks folder, acc, acc_norm) with acc_norm computed the same way (log-likelihood / choice characters)."""
    rng = random.Random(1)
    rows, hits, norm_hits = [], 0, 0
    for index in range(6):
        question = words(rng, rng.randint(2, 6))
        choices = [words(rng, rng.randint(1, 4)) for _ in range(3)]
        lls = choice_loglikelihoods(model_a, tokenizer, question, choices)
        best = max(range(3), key=lambda i: lls[i])
        best_norm = max(range(3), key=lambda i: lls[i] / len(choices[i]))
        label = best if index < 4 else (best + 1) % 3
        hits, norm_hits = hits + (label == best), norm_hits + (label == best_norm)
        rows.append({"question": question, "choices": choices, "label": label})
    folder = tmp_path_factory.mktemp("tasks")
    write_mc_task(folder, rows)
    return folder, hits / 6, norm_hits / 6


def test_lm_eval_accuracy_matches_the_argmax_by_hand(model_a, tokenizer, mc_task):
    folder, acc, acc_norm = mc_task
    assert acc == pytest.approx(4 / 6)
    items = lm_eval_items(model_a, tokenizer, [TASK], folder, batch_size=4)
    assert set(items) == {f"{TASK}/acc", f"{TASK}/acc_norm"} and len(items[f"{TASK}/acc"]) == 6  # one per document
    assert items[f"{TASK}/acc"][:4] == [1.0] * 4 and items[f"{TASK}/acc"][4:] == [0.0] * 2  # in document order
    assert sum(items[f"{TASK}/acc_norm"]) / 6 == pytest.approx(acc_norm)


def test_shared_context_scores_equal_hflms_request_by_request(model_a, tokenizer):
    """SharedContextHFLM runs each context once and continues every choice from its KV cache; its log-likelihoods and
    greedy flags equal HFLM's own (context + continuation per request), for one- and many-token continuations, several
    contexts of different lengths in one batch, and a request too long for the model (HFLM's truncating path). It feeds
    the model fewer tokens: the contexts count once."""
    from lm_eval.models.huggingface import HFLM

    from evaluation.lm_eval_scorer import SharedContextHFLM

    rng = random.Random(3)
    requests = []
    for _ in range(5):
        context = tokenizer(words(rng, rng.randint(10, 16)))["input_ids"]
        for length in (1, 2, rng.randint(3, 7)):
            continuation = tokenizer(" " + words(rng, 6))["input_ids"][:length]
            requests.append((("ctx", "cont"), context, continuation))
    requests.append((("long", "cont"), list(range(5, 75)), [7, 8, 9]))  # 73 tokens > max_length + 1: truncated
    rng.shuffle(requests)
    fed = []
    hook = model_a.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append((args[0] if args else kwargs["input_ids"]).numel()), with_kwargs=True)
    try:
        shared = SharedContextHFLM(pretrained=model_a, tokenizer=tokenizer, batch_size=3, max_length=64)
        got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
        shared_tokens, fed[:] = sum(fed), []
        plain = HFLM(pretrained=model_a, tokenizer=tokenizer, batch_size=3, max_length=64)
        want = HFLM._loglikelihood_tokens(plain, requests, disable_tqdm=True)
        plain_tokens = sum(fed)
    finally:
        hook.remove()
    assert_close(torch.tensor([ll for ll, _ in got]), torch.tensor([ll for ll, _ in want]), atol=1e-4, rtol=0)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    assert shared_tokens < 0.7 * plain_tokens


def test_an_unknown_task_is_named(model_a, tokenizer, mc_task):
    with pytest.raises(EvalError, match="no_such_task"):
        lm_eval_items(model_a, tokenizer, ["no_such_task"], mc_task[0])


# ---------------------------------------------------------------------------------------------------
# Chunked logits on a Gemma-sized vocabulary, the device and dtype


@pytest.fixture(scope="module")
def wide_vocab_model():
    """A one-layer Llama with Gemma's 262,144-token vocabulary and a hidden size of 16 (~17 MB in fp32)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=262_144, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # spread-out logits: the KL is far from 0
    return model


def test_chunked_kl_and_nll_equal_the_unchunked_float64_values(wide_vocab_model):
    """Per row, over chunks that do not divide the number of positions, against full [batch, length, vocab]
    logits in float64. The other model is the same one with its LM head perturbed."""
    other = copy.deepcopy(wide_vocab_model)
    other.lm_head.weight.data += 0.3 * torch.randn_like(other.lm_head.weight)
    rows = [torch.randint(3, 262_144, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 5, 12)]
    with torch.no_grad():
        log_probs = {id(m): [torch.log_softmax(copy.deepcopy(m).double()(torch.tensor([r])).logits[0, :-1], -1)
                             for r in rows] for m in (wide_vocab_model, other)}
    expected_nll = [-lp.gather(1, torch.tensor(r[1:])[:, None]).sum().item()
                    for lp, r in zip(log_probs[id(other)], rows)]
    examples = [ResponseExample(r, 3) for r in rows]  # the response: tokens 3.. , predicted at positions 2..
    expected_kl = [(p.exp() * (p - q)).sum(-1)[2:].sum().item()
                   for p, q in zip(log_probs[id(wide_vocab_model)], log_probs[id(other)])]
    for chunk_size in (7, 100):
        nll = nll_rows(Backbone(other), rows, pad=0, batch_size=2, chunk_size=chunk_size)
        assert [count for _, count in nll] == [len(r) - 1 for r in rows]
        assert_close(torch.tensor([total for total, _ in nll], dtype=torch.float64),
                     torch.tensor(expected_nll, dtype=torch.float64),
                     rtol=1e-5, atol=0)
        states = reference_states(Backbone(wide_vocab_model), examples, pad=0, batch_size=2)
        kl = kl_rows(Backbone(other), states, examples, pad=0, batch_size=2, chunk_size=chunk_size)
        assert [count for _, count in kl] == [len(r) - 3 for r in rows]
        assert min(expected_kl) > 1
        assert_close(torch.tensor([total for total, _ in kl], dtype=torch.float64),
                     torch.tensor(expected_kl, dtype=torch.float64),
                     rtol=1e-4, atol=0)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(EvalError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")


def test_a_bootstrap_of_pooled_distinct_2_misses_its_estimate_which_is_why_it_gets_no_interval():
    """Resampling continuations with replacement repeats them: their bigrams count again in the total but never
    as new distinct ones, so every resample is biased low. With all-distinct continuations the estimate is 1 and
    the whole percentile interval lies below it: the evaluation reports pooled distinct_2 without one."""
    from evaluation import stats

    tokens = [[10 * i + j for j in range(8)] for i in range(30)]  # every bigram distinct: pooled distinct_2 = 1
    bigram_sets = [set(zip(t, t[1:])) for t in tokens]

    def pooled(indices):
        total = sum(len(bigram_sets[i]) for i in indices)
        return len(set().union(*(bigram_sets[i] for i in indices))) / total

    interval = stats.bootstrap_statistic(len(tokens), pooled, num_resamples=200)
    assert interval.estimate == distinct_n(tokens, 2) == 1.0
    assert interval.high < interval.estimate


# ---------------------------------------------------------------------------------------------------
# Several models, the report, the CLI


INSTRUCTIONS = [
    {"key": "0", "prompt": "w1 w2 w3", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": "1", "prompt": "w4 w5", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
     "kwargs": [{}, {}]},
]


def test_evaluate_models_end_to_end(tiny_a, tiny_b, chat_rows, mc_task, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": words(random.Random(i), 4)} for i in range(3)])
    instruct = write_jsonl(tmp_path / "instruct.jsonl", [{"messages": m} for m in chat_rows])
    text = write_jsonl(tmp_path / "text.jsonl", rows_for("text", 3))
    instructions = write_jsonl(tmp_path / "ifeval.jsonl", INSTRUCTIONS)
    config = EvalConfig(prompts=prompts, instruct=instruct, text=text, instructions=instructions, tasks=(TASK,),
                        tasks_dir=mc_task[0], max_new_tokens=8, fixed_new_tokens=12, batch_size=2,
                        bootstrap_resamples=200)
    results = evaluate_models({"source": tiny_a, "copy": tiny_a, "other": tiny_b}, "source", config)

    models = results["models"]
    assert list(models) == ["source", "copy", "other"]
    source, same, other = (models[name]["metrics"] for name in models)
    assert source["kl_to_reference"] == 0.0 and source["length_ratio"] == 1.0
    assert same == source  # the same weights under another name: every number equal, the KL computed as 0
    assert models["copy"]["intervals"]["kl_to_reference"] == [0.0, 0.0]
    assert other["kl_to_reference"] > 0
    assert other["length_ratio"] == pytest.approx(other["mean_length"] / source["mean_length"])
    expected = {"seq_rep_4", "loop_rate", "distinct_2", "mean_length", "length_ratio", "stopped_share",
                "fixed_seq_rep_4", "fixed_loop_rate", "kl_to_reference", "perplexity", "if_prompt_strict",
                "if_prompt_loose", "if_instruction_strict", "if_instruction_loose", f"{TASK}/acc", f"{TASK}/acc_norm"}
    assert set(other) == expected and set(models["other"]["intervals"]) == expected - {"distinct_2"}  # pooled
    assert all(low <= other[name] <= high for name, (low, high) in models["other"]["intervals"].items())
    assert source[f"{TASK}/acc"] == pytest.approx(mc_task[1])
    assert all(len(m["continuations"]) == 3 and len(m["fixed_continuations"]) == 3 for m in models.values())

    # Per-item values: what the bootstrap resamples, and what every estimate is computed from.
    items = models["other"]["items"]
    assert len(items["fixed_seq_rep_4"]) == 3 and len(items[f"{TASK}/acc"]) == 6
    assert other["perplexity"] == pytest.approx(math.exp(sum(n for n, _ in items["perplexity"]) /
                                                         sum(c for _, c in items["perplexity"])))
    # The instruction scores are those of the responses as written to eval.json.
    scores = ifeval.score_responses(ifeval.load_instruction_prompts(instructions), models["other"]["if_responses"])
    assert items["if_prompt_strict"] == [float(x) for x in scores.prompt_strict]
    assert items["if_instruction_loose"] == [list(pair) for pair in scores.instruction_loose]

    # Paired differences: every model against the reference and the two non-reference models against each other.
    pairs = {(row["a"], row["b"]) for row in results["differences"]}
    assert pairs == {("copy", "source"), ("other", "source"), ("copy", "other")}
    same_rows = [row for row in results["differences"] if (row["a"], row["b"]) == ("copy", "source")]
    assert {row["metric"] for row in same_rows} == {"fixed_seq_rep_4", "fixed_loop_rate", "kl_to_reference",
                                                    "perplexity", "if_prompt_strict", "if_instruction_loose",
                                                    f"{TASK}/acc", f"{TASK}/acc_norm"}
    assert all(row["estimate"] == row["low"] == row["high"] == 0.0 for row in same_rows)  # a model against itself

    out = write_report(results, tmp_path / "report")
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(results))
    report = (out / "eval.md").read_text()
    assert all(f"| {name} |" in report for name in models) and all(f" {metric} |" in report for metric in expected)
    assert "| copy − source | no difference measured" in report
    assert models["other"]["continuations"][0] in report and models["other"]["fixed_continuations"][0] in report
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".report.partial-*"))


def test_plot_accepts_an_estimate_outside_its_interval(tmp_path):
    """Pooled distinct_2 lies above its percentile interval when most resamples repeat continuations (seen on
    the demo): the plot draws no whisker on that side instead of failing."""
    results = {"models": {"m": {"metrics": {"distinct_2": 0.95}, "intervals": {"distinct_2": [0.47, 0.9]}}}}
    plot_metrics(results, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_unknown_reference_exits_2_and_names_it(tiny_a, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["--model", f"a={tiny_a}", "--reference", "nosuchmodel", "--out", str(tmp_path / "out")]) == 2
    assert "'nosuchmodel'" in caplog.text
    assert not (tmp_path / "out").exists()


def test_cli_missing_folder_and_other_vocabulary_are_named(tiny_a, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        argv = ["--model", f"a={tiny_a}", "--model", f"gone={tmp_path / 'gone'}", "--out", str(tmp_path / "out")]
        assert main(argv) == 2
    assert "'gone'" in caplog.text

    other_vocab = tmp_path / "other-vocab"
    other_vocab.mkdir()
    shutil.copy(tiny_a / "config.json", other_vocab / "config.json")
    save_tiny_tokenizer(other_vocab, 300)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["--model", f"a={tiny_a}", "--model", f"odd={other_vocab}", "--reference", "a",
                     "--out", str(tmp_path / "out")]) == 2
    assert "'odd'" in caplog.text and "vocabulary" in caplog.text


def test_cli_malformed_model_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "NAME=DIR" in capsys.readouterr().err


def _adapter_on(base_dir, out_dir, seed: int = 0):
    """A LoRA adapter on `base_dir` with nonzero B (a fresh LoRA is the identity), saved to out_dir."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out_dir)  # base_model_name_or_path: base_dir
    return model.merge_and_unload()


def test_an_adapter_folder_is_evaluated_as_its_merged_model(tiny_a, tmp_path, chat_rows):
    """A heal's checkpoint-N/ (a PEFT adapter) scores exactly as the merged model saved in full: the study evaluates
    checkpoints without writing a merged copy of each."""
    merged = _adapter_on(tiny_a, tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_a).save_pretrained(tmp_path / "merged")
    instruct = write_jsonl(tmp_path / "instruct.jsonl", [{"messages": rows} for rows in chat_rows])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": p} for p in user_prompts(4)])
    config = EvalConfig(prompts=prompts, instruct=instruct, max_new_tokens=8, fixed_new_tokens=8,
                        bootstrap_resamples=10)
    results = evaluate_models({"base": tiny_a, "merged": tmp_path / "merged", "adapter": tmp_path / "adapter"},
                              "base", config)
    merged_items, adapter_items = (results["models"][name]["items"] for name in ("merged", "adapter"))
    assert adapter_items == merged_items
    assert results["models"]["adapter"]["fixed_continuations"] == results["models"]["merged"]["fixed_continuations"]
    # Not the base model in disguise: the adapter moved the KL away from 0.
    assert sum(total for total, _ in adapter_items["kl_to_reference"]) > 1e-4


def test_an_adapter_whose_base_is_gone_is_named(tiny_a, tmp_path, caplog):
    adapter = tmp_path / "adapter"
    _adapter_on(tiny_a, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.ERROR):
        assert main(["--model", f"a={tiny_a}", "--model", f"healed={adapter}", "--out", str(tmp_path / "out")]) == 2
    assert "moved-away" in caplog.text and str(adapter) in caplog.text
