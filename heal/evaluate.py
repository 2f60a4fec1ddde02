"""Coherence and fidelity of several causal LMs side by side: did the stack (or the heal) break the model?

    python -m heal.evaluate --model source=models/e4b --model raw=out/e6b-raw --model healed=out/heal/merged \\
        --reference source --prompts prompts.jsonl --instruct heldout_chat.jsonl --text heldout_text.jsonl \\
        --tasks tiny_arc,tiny_hellaswag --tasks-dir eval_tasks/ --out out/eval

Inputs (JSONL, one object a line; every one optional, a metric without its input is left out):
  --prompts   {"prompt": "text"}, {"prompt": [messages]} or {"messages": [messages]} (trailing assistant
              turns are dropped, so a chat file can serve as prompts); rendered with the chat template and
              add_generation_prompt=True.
  --instruct  TRL "messages" rows: [{"role", "content"}, ...], the last message the assistant's, or
              conversational prompt/completion rows.
  --text      {"text": "..."} rows.
  --tasks     lm-eval-harness task names, defined by the YAMLs in --tasks-dir (local data, no hub).

Metrics, per model (↓ lower is better, ↑ higher is better):
  Greedy continuations of the prompts (batched, left-padded, at most --max-new-tokens tokens, stopped at
  the tokenizer's EOS or end-of-turn token, which is not kept):
  seq_rep_4 ↓       mean over continuations of 1 − |unique 4-grams| / |4-grams| (Welleck et al. 2019,
                    "seq-rep-n"); 0 for a continuation of fewer than 4 tokens.
  loop_rate ↓       share of continuations that end in a loop: they ran to max_new_tokens without a stop
                    token, and for some period p in 1..16 their last L = max(3·p, 12) tokens are periodic,
                    tail[j] == tail[j − p] for p ≤ j < L (see `ends_in_loop`).
  distinct_2 ↑      unique bigrams / bigrams, pooled over all of the model's continuations (Li et al. 2016).
  mean_length       mean continuation length in tokens.
  length_ratio      mean_length / the reference's mean_length (1 for the reference; none without one).
  Teacher-forced on --instruct:
  kl_to_reference ↓ mean over the tokens of every row's final assistant message of KL(reference ‖ model),
                    in nats per token (`heal.distill.token_kl`). The response tokens are those of
                    apply_chat_template(messages) after apply_chat_template(messages[:-1],
                    add_generation_prompt=True), each conversation cut to --max-length tokens (a row
                    whose prompt fills them is left out). 0 for the reference; none without one.
  On --text:
  perplexity ↓      exp(total NLL / total predicted tokens), each row cut to --max-length tokens.
  On --tasks:
  <task>/acc ↑      lm-eval-harness accuracy (and <task>/acc_norm when the task reports it).

Outputs, in --out (written beside it, then renamed into place): eval.json (every number and every
continuation as text), eval.md (a table and the samples) and eval.png (one bar chart per metric).
Models are loaded one at a time in fp32; the reference stays loaded alongside to score the KL.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from heal.distill import token_kl
from stack.atomic import staged_output

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# End-of-turn tokens of common chat templates (ChatML, Gemma, Llama 3, Phi-3): generation stops at
# these as well as at the tokenizer's eos_token, since chat models often end a turn without EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# Which way each metric is better, for the plot titles (task metrics are accuracies: higher).
DIRECTION = {
    "seq_rep_4": "lower is better",
    "loop_rate": "lower is better",
    "distinct_2": "higher is better",
    "mean_length": "",
    "length_ratio": "closer to 1 is better",
    "kl_to_reference": "lower is better",
    "perplexity": "lower is better",
}


class EvalError(ValueError):
    """Bad input (a file, a row, a model folder, a flag); the CLI reports it and exits with 2."""


@dataclass(frozen=True)
class EvalConfig:
    prompts: Path | None = None  # JSONL of chat prompts, for the degeneration metrics
    instruct: Path | None = None  # JSONL of TRL "messages" rows, for kl_to_reference
    text: Path | None = None  # JSONL of {"text"} rows, for perplexity
    tasks: tuple[str, ...] = ()  # lm-eval-harness task names
    tasks_dir: Path | None = None  # folder of task YAMLs; None: lm-eval's built-in tasks
    max_new_tokens: int = 64
    batch_size: int = 8
    max_length: int = 256  # tokens per --text row and per --instruct conversation
    num_prompts: int | None = None  # use the first N prompts (None: all)
    num_rows: int | None = None  # use the first N rows of --instruct and of --text (None: all)
    task_limit: int | None = None  # lm-eval: the first N documents of each task (None: all)
    seed: int = 0  # lm-eval's seeds (few-shot sampling)
    # ends_in_loop's parameters
    max_period: int = 16
    min_repeats: int = 3
    min_tail: int = 12


# ---------------------------------------------------------------------------------------------------
# Pure metrics on token sequences


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(tokens: Sequence[int], n: int = 4) -> float:
    """1 − |unique n-grams| / |n-grams| of one sequence (Welleck et al. 2019); 0.0 below n tokens."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams / n-grams over all sequences; 0.0 if none."""
    grams = [gram for tokens in sequences for gram in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ends_in_loop(tokens: Sequence[int], stopped: bool, max_period: int = 16, min_repeats: int = 3, min_tail: int = 12) -> bool:
    """Whether a continuation ends in a loop: generation was cut off (`stopped` is False: no stop token
    within max_new_tokens) and, for some period p in 1..max_period, its last L = max(min_repeats·p,
    min_tail) tokens are periodic: tail[j] == tail[j − p] for every p ≤ j < L, so the tail holds at
    least min_repeats copies of a p-token unit. A sequence shorter than L cannot loop with period p.
    A continuation that stopped by itself is never a loop, however repetitive."""
    if stopped:
        return False
    for period in range(1, max_period + 1):
        length = max(min_repeats * period, min_tail)
        if len(tokens) < length:
            continue
        tail = tokens[-length:]
        if all(tail[j] == tail[j - period] for j in range(period, length)):
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# Input files


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file, in order (blank lines skipped); errors name the file and row."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalError(f"{path} line {line_number}: not JSON ({error})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path} row {len(rows)}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no rows")
    return rows


def _check_messages(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise EvalError(f"{where}: expected a non-empty list of messages")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise EvalError(f"{where}: every message needs a string 'role' and 'content', got {message!r}")
    return messages


def load_prompts(path: Path, limit: int | None = None) -> list[Messages]:
    """Chat prompts, each ending before the assistant's turn (see the module docstring for the row formats)."""
    prompts = []
    for index, row in enumerate(read_jsonl(path)[:limit]):
        where = f"{path} row {index}"
        if isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        elif "prompt" in row or "messages" in row:
            messages = list(_check_messages(row.get("prompt", row.get("messages")), where))
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages:
                raise EvalError(f"{where}: no message before the assistant's")
        else:
            raise EvalError(f"{where}: expected a 'prompt' or 'messages' field, got {sorted(row)}")
        prompts.append(messages)
    return prompts


def load_instruct(path: Path, limit: int | None = None) -> list[Messages]:
    """Held-out responses for the KL: TRL "messages" rows whose last message is the assistant's, or
    conversational prompt/completion rows (read as prompt + completion)."""
    rows = []
    for index, row in enumerate(read_jsonl(path)[:limit]):
        where = f"{path} row {index}"
        turns = row["prompt"] + row["completion"] if isinstance(row.get("completion"), list) and isinstance(row.get("prompt"), list) else row.get("messages")
        messages = _check_messages(turns, where)
        if messages[-1]["role"] != "assistant":
            raise EvalError(f"{where}: the last message must be the assistant's, got role {messages[-1]['role']!r}")
        if len(messages) < 2:
            raise EvalError(f"{where}: an assistant message needs a prompt before it")
        rows.append(messages)
    return rows


def load_texts(path: Path, limit: int | None = None) -> list[str]:
    texts = []
    for index, row in enumerate(read_jsonl(path)[:limit]):
        if not isinstance(row.get("text"), str):
            raise EvalError(f"{path} row {index}: expected a string 'text' field")
        texts.append(row["text"])
    return texts


# ---------------------------------------------------------------------------------------------------
# Tokens and batches


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes any BOS itself; letting the tokenizer add special tokens would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS and whichever known end-of-turn tokens its vocabulary has. Looked up in the
    vocabulary: convert_tokens_to_ids maps an unknown token to <unk>, which would then stop generation."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return sorted(set(ids))


def pad_id(tokenizer) -> int:
    # Padded positions are masked out everywhere, so any id does; EOS when the tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(sequences: Sequence[Sequence[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both [batch, longest], padded on `side` ("left"/"right")."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        span = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
        ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] logits on the CPU, for inputs given on the CPU."""
    return model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits.cpu()


# ---------------------------------------------------------------------------------------------------
# Greedy continuations


@dataclass(frozen=True)
class Continuation:
    tokens: list[int]  # generated tokens, the stop token excluded
    stopped: bool  # True if generation ended at a stop token, False if it ran to max_new_tokens


@torch.inference_mode()
def greedy_continuations(
    model, tokenizer, prompts: Sequence[Messages], max_new_tokens: int = 64, batch_size: int = 8
) -> list[Continuation]:
    """Greedy decoding of each chat prompt (chat template, add_generation_prompt=True), in left-padded
    batches: left padding keeps every prompt's last token in the last column, where generation continues."""
    stops, pad = stop_token_ids(tokenizer), pad_id(tokenizer)
    encoded = [chat_ids(tokenizer, messages, add_generation_prompt=True) for messages in prompts]
    continuations = []
    for batch in tqdm(batches(encoded, batch_size), desc="generate", unit="batch"):
        input_ids, attention_mask = pad_batch(batch, pad, side="left")
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad,
            # transformers 5 fills whatever is not passed from the checkpoint's generation_config.json: switch off
            # the anti-repetition settings some ship with, since repetition is what these metrics measure.
            repetition_penalty=1.0, no_repeat_ngram_size=0,
        )  # [batch, prompt width + generated]; a row that stopped early is filled with `pad` after its stop token
        for row in output[:, input_ids.shape[1] :].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            continuations.append(Continuation(row[:end], stopped=end is not None))
    return continuations


def degeneration_metrics(continuations: Sequence[Continuation], config: EvalConfig) -> dict[str, float]:
    tokens = [c.tokens for c in continuations]
    loops = [ends_in_loop(c.tokens, c.stopped, config.max_period, config.min_repeats, config.min_tail) for c in continuations]
    return {
        "seq_rep_4": sum(seq_rep_n(t, 4) for t in tokens) / len(tokens),
        "loop_rate": sum(loops) / len(loops),
        "distinct_2": distinct_n(tokens, 2),
        "mean_length": sum(len(t) for t in tokens) / len(tokens),
    }


# ---------------------------------------------------------------------------------------------------
# KL to the reference, on the final assistant message


@dataclass(frozen=True)
class ResponseExample:
    input_ids: list[int]  # the whole conversation
    prompt_length: int  # tokens before the final assistant message; the rest are response tokens


def encode_response_examples(tokenizer, rows: Sequence[Messages], source: str = "instruct",
                             max_length: int | None = None) -> list[ResponseExample]:
    """Each row as (full ids, prompt length); the prompt must tokenize to a prefix of the full conversation,
    else "response tokens" would be meaningless. `source` names the rows in errors (e.g. the file). With
    `max_length`, a conversation is cut to its first max_length tokens (a response is scored on its
    start), and a row whose prompt alone fills them is left out: it has no response token to score."""
    examples, skipped = [], 0
    for index, messages in enumerate(rows):
        if messages[-1]["role"] != "assistant":
            raise EvalError(f"{source} row {index}: the last message must be the assistant's")
        prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        full = chat_ids(tokenizer, messages, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise EvalError(f"{source} row {index}: the chat template's prompt (add_generation_prompt=True) is not a prefix "
                            "of the full conversation's tokens, so the assistant's tokens cannot be located")
        if len(full) == len(prompt):
            raise EvalError(f"{source} row {index}: the assistant message has no tokens")
        if max_length is not None and len(prompt) >= max_length:
            skipped += 1
            continue
        examples.append(ResponseExample(full[:max_length], len(prompt)))
    if skipped:
        logger.info("%s: %d row(s) left out of the KL, their prompt alone has >= %d tokens", source, skipped, max_length)
    if not examples:
        raise EvalError(f"{source}: no row has a response token within the first {max_length} tokens; raise --max-length")
    return examples


def response_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """[batch, width] bool over logit positions: position t predicts token t + 1, so the response tokens
    prompt_length..length−1 are predicted at positions prompt_length−1..length−2."""
    positions = torch.arange(width)
    starts = torch.tensor(prompt_lengths)[:, None] - 1
    ends = torch.tensor(lengths)[:, None] - 1
    return (positions >= starts) & (positions < ends)


def response_kl_sum(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(Σ KL(reference ‖ model) over the masked positions, number of positions); logits [batch, seq, vocab]."""
    kl = token_kl(reference_logits[mask], logits[mask])  # [masked positions], fp32
    return kl.sum().item(), int(mask.sum())


@torch.inference_mode()
def mean_kl_to_reference(
    model, reference_model, tokenizer, rows: Sequence[Messages], batch_size: int = 8, source: str = "instruct",
    max_length: int | None = None,
) -> float:
    """Token-weighted mean KL(reference ‖ model), in nats, over the final assistant message of every row
    (each conversation cut to its first `max_length` tokens)."""
    examples = encode_response_examples(tokenizer, rows, source, max_length)
    total, count = 0.0, 0
    for batch in tqdm(batches(examples, batch_size), desc="kl", unit="batch"):
        input_ids, attention_mask = pad_batch([e.input_ids for e in batch], pad_id(tokenizer), side="right")
        mask = response_mask([e.prompt_length for e in batch], [len(e.input_ids) for e in batch], input_ids.shape[1])
        reference_logits = _logits(reference_model, input_ids, attention_mask)  # [batch, seq, vocab]
        batch_total, batch_count = response_kl_sum(reference_logits, _logits(model, input_ids, attention_mask), mask)
        total, count = total + batch_total, count + batch_count
    return total / count


# ---------------------------------------------------------------------------------------------------
# Perplexity


@torch.inference_mode()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 8) -> float:
    """exp(Σ NLL / Σ predicted tokens) over all rows; a row of n tokens (after truncation to max_length,
    with the tokenizer's usual special tokens) predicts n − 1 of them."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    total_nll, count = 0.0, 0
    for batch in tqdm(batches(encoded, batch_size), desc="perplexity", unit="batch"):
        input_ids, attention_mask = pad_batch(batch, pad_id(tokenizer), side="right")
        logits = _logits(model, input_ids, attention_mask)[:, :-1].float()  # [batch, seq − 1, vocab]: predicts tokens 1..
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # [batch, seq − 1]; padding ignored
        total_nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    if count == 0:
        raise EvalError("perplexity: no row has two tokens, so nothing is predicted")
    return math.exp(total_nll / count)


# ---------------------------------------------------------------------------------------------------
# lm-eval-harness


@contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid hub access for the block. huggingface_hub and datasets read HF_HUB_OFFLINE at import time,
    which has happened by now, so the module constants are switched too (and everything restored after)."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_flags = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved_flags
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def lm_eval_scores(
    model, tokenizer, tasks: Sequence[str], tasks_dir: Path | None = None, batch_size: int = 8, seed: int = 0,
    limit: int | None = None,
) -> dict[str, float]:
    """{"<task>/acc": ..., "<task>/acc_norm": ...} from lm-eval-harness on an already loaded model.

    Checked with transformers 5.24 + lm_eval 0.4.13: HFLM takes the model object as is (no workaround needed).
    With a tasks_dir, only its tasks are indexed: lm-eval's ~14k built-in tasks take ~13 s to index and
    would need the hub for their data anyway."""
    # Imported here: lm_eval is only needed with --tasks.
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with hub_offline():
        task_manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None, include_defaults=tasks_dir is None)
        missing = [task for task in tasks if task not in task_manager.all_tasks]
        if missing:
            raise EvalError(f"lm-eval tasks not found in {tasks_dir or 'the built-in tasks'}: {', '.join(missing)}")
        # HFLM uses a passed-in model on its own device, and tokenizes with the tokenizer's own special-token defaults.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=task_manager, log_samples=False, limit=limit,
            bootstrap_iters=0,  # point estimates only; the bootstrap would cost time for stderrs we do not report
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    scores = {}
    for task, metrics in output["results"].items():
        for metric in ("acc", "acc_norm"):
            # Metrics are keyed "<metric>,<filter>"; multiple-choice tasks have only the "none" filter.
            if f"{metric},none" in metrics:
                scores[f"{task}/{metric}"] = float(metrics[f"{metric},none"])
    return scores


# ---------------------------------------------------------------------------------------------------
# Several models


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def check_models(models: dict[str, Path], reference: str | None) -> dict[str, Any]:
    """Fail before any model is loaded: missing folders, an unknown reference, differing vocabularies
    (the KL compares distributions token by token, so the ids must mean the same). Returns the tokenizers."""
    if not models:
        raise EvalError("no models to evaluate")
    if reference is not None and reference not in models:
        raise EvalError(f"reference {reference!r} is not among the models ({', '.join(models)})")
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise EvalError(f"model {name!r}: {path} is not a model folder (no config.json)")
    tokenizers = {name: load_tokenizer(Path(path)) for name, path in models.items()}
    baseline = reference if reference is not None else next(iter(models))
    baseline_vocab = tokenizers[baseline].get_vocab()
    for name, tokenizer in tokenizers.items():
        vocab = tokenizer.get_vocab()
        if vocab != baseline_vocab:
            differing = sorted(set(vocab.items()) ^ set(baseline_vocab.items()))[:3]
            raise EvalError(f"model {name!r}: its tokenizer's vocabulary ({len(vocab)} tokens) differs from {baseline!r}'s "
                            f"({len(baseline_vocab)} tokens), e.g. {differing}")
    return tokenizers


def evaluate_models(models: dict[str, Path], reference: str | None, config: EvalConfig) -> dict:
    """Every metric for every model, plus the continuations as text. The reference (if any) is evaluated
    first and kept loaded to score the others' KL; every other model is loaded, scored and freed in turn."""
    tokenizers = check_models(models, reference)
    prompts = load_prompts(config.prompts, config.num_prompts) if config.prompts else []
    instruct = load_instruct(config.instruct, config.num_rows) if config.instruct else []
    texts = load_texts(config.text, config.num_rows) if config.text else []
    if config.tasks and config.tasks_dir and not Path(config.tasks_dir).is_dir():
        raise EvalError(f"--tasks-dir {config.tasks_dir}: no such folder")

    order = ([reference] if reference else []) + [name for name in models if name != reference]
    reference_model = None
    results: dict[str, dict] = {}
    for name in order:
        logger.info("evaluating %s (%s)", name, models[name])
        model = load_model(Path(models[name]))
        is_reference = name == reference
        results[name] = _evaluate_one(model, tokenizers[name], is_reference, reference_model, prompts, instruct, texts, config)
        if is_reference:
            reference_model = model
        else:
            del model
            gc.collect()

    reference_length = results[reference]["metrics"].get("mean_length") if reference else None
    for result in results.values():
        metrics = result["metrics"]
        if "mean_length" in metrics:
            metrics["length_ratio"] = metrics["mean_length"] / reference_length if reference_length else None
    return {
        "reference": reference,
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
        "prompts": [messages[-1]["content"] for messages in prompts],
        "models": {name: {"path": str(models[name]), **results[name]} for name in models},
    }


def _evaluate_one(model, tokenizer, is_reference: bool, reference_model, prompts, instruct, texts, config: EvalConfig) -> dict:
    metrics: dict[str, float | None] = {}
    continuations: list[str] = []
    if prompts:
        generated = greedy_continuations(model, tokenizer, prompts, config.max_new_tokens, config.batch_size)
        metrics.update(degeneration_metrics(generated, config))
        continuations = [tokenizer.decode(c.tokens) for c in generated]
    if instruct:
        if is_reference:
            metrics["kl_to_reference"] = 0.0  # KL(p ‖ p), by definition; no need to run it
        elif reference_model is not None:
            metrics["kl_to_reference"] = mean_kl_to_reference(
                model, reference_model, tokenizer, instruct, config.batch_size, source=str(config.instruct), max_length=config.max_length
            )
        else:
            metrics["kl_to_reference"] = None
    if texts:
        metrics["perplexity"] = perplexity(model, tokenizer, texts, config.max_length, config.batch_size)
    if config.tasks:
        metrics.update(lm_eval_scores(model, tokenizer, config.tasks, config.tasks_dir, config.batch_size, config.seed,
                                      config.task_limit))
    return {"metrics": metrics, "continuations": continuations}


# ---------------------------------------------------------------------------------------------------
# Report


def write_report(results: dict, out_dir: Path) -> Path:
    """eval.json, eval.md and eval.png in out_dir, which appears whole or not at all."""
    out_dir = Path(out_dir)
    with staged_output(out_dir) as staging:
        (staging / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (staging / "eval.md").write_text(markdown_report(results))
        plot_metrics(results, staging / "eval.png")
    logger.info("wrote %s", out_dir)
    return out_dir


def metric_names(results: dict) -> list[str]:
    """Metrics that at least one model has a value for: the built-in ones in DIRECTION's order, then the tasks'."""
    names: dict[str, None] = {}
    for model in results["models"].values():
        names.update({name: None for name, value in model["metrics"].items() if value is not None})
    return [name for name in DIRECTION if name in names] + [name for name in names if name not in DIRECTION]


def _format(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _fenced(text: str) -> str:
    # A fence longer than any backtick run inside, so that generated backticks cannot close it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def markdown_report(results: dict) -> str:
    names = metric_names(results)
    reference = results["reference"]
    lines = ["# Evaluation", "", f"Reference: `{reference}`" if reference else "No reference model.", ""]
    lines += ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, result in results["models"].items():
        lines.append(f"| {model} | " + " | ".join(_format(result["metrics"].get(name)) for name in names) + " |")
    if results["prompts"]:
        lines += ["", "## Samples", "", f"Greedy, at most {results['config']['max_new_tokens']} new tokens."]
        for index, prompt in enumerate(results["prompts"]):
            lines += ["", f"### Prompt {index}", "", _fenced(prompt)]
            for model, result in results["models"].items():
                lines += ["", f"**{model}**", "", _fenced(result["continuations"][index])]
    return "\n".join(lines) + "\n"


def plot_metrics(results: dict, path: Path) -> None:
    """One small bar chart per metric, the models side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    names = metric_names(results)
    models = list(results["models"])
    columns = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        values = [results["models"][model]["metrics"].get(name) for model in models]
        axis.bar(range(len(models)), [math.nan if v is None else v for v in values], color=[f"C{i}" for i in range(len(models))])
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        direction = DIRECTION.get(name, "higher is better")  # the rest are lm-eval accuracies
        axis.set_title(f"{name}\n({direction})" if direction else name, fontsize=9)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# CLI


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m heal.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a model to evaluate (repeatable)")
    parser.add_argument("--reference", help="NAME of the reference model (normally the source): kl_to_reference, length_ratio")
    parser.add_argument("--prompts", type=Path, help="JSONL of chat prompts")
    parser.add_argument("--instruct", type=Path, help='JSONL of TRL "messages" rows, the last message the assistant\'s')
    parser.add_argument("--text", type=Path, help='JSONL of {"text": ...} rows')
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    parser.add_argument("--tasks-dir", type=Path, help="folder of lm-eval task YAMLs")
    parser.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    parser.add_argument("--max-length", type=int, default=EvalConfig.max_length, help="tokens per --text row and --instruct conversation")
    parser.add_argument("--num-prompts", type=int, help="use the first N prompts")
    parser.add_argument("--num-rows", type=int, help="use the first N rows of --instruct and --text")
    parser.add_argument("--task-limit", type=int, help="lm-eval: use the first N documents of each task")
    parser.add_argument("--seed", type=int, default=EvalConfig.seed)
    parser.add_argument("--out", type=Path, default=Path("out/eval"), help="output folder (default: out/eval)")
    return parser


def parse_models(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--model {spec!r}: expected NAME=DIR")
        if name in models:
            parser.error(f"--model {name!r} given twice")
        models[name] = Path(folder)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = parse_models(parser, args.model)
    config = EvalConfig(
        prompts=args.prompts, instruct=args.instruct, text=args.text, tasks=tuple(t for t in args.tasks.split(",") if t),
        tasks_dir=args.tasks_dir, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=args.max_length,
        num_prompts=args.num_prompts, num_rows=args.num_rows, task_limit=args.task_limit, seed=args.seed,
    )
    try:
        write_report(evaluate_models(models, args.reference, config), args.out)
    except EvalError as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
