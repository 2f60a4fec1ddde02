"""Teacher-forced scores, per row: the KL to the reference over each chat row's final assistant message (over every
token of a plain-text row), and the NLL of each text row. The backbone's final hidden states go through the LM head
`chunk_size` positions at a time in fp32 (core.logits.LogitHead, Gemma's soft-capping included), so no
[batch, length, vocab] tensor is built. The reference's hidden states at the response positions are kept once
(`ReferenceStates`): each model's KL needs only its own forward."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from core.logits import HiddenCapture, LogitHead, token_log_likelihoods
from core.tokens import pad_batch
from evaluation.config import EvalError
from evaluation.inputs import ChatOrText, chat_ids, length_sorted_batches

logger = logging.getLogger(__name__)

Row = tuple[float, int]  # (Σ over the row's scored tokens, number of scored tokens)


class Backbone:
    """A causal LM's final hidden states [batch, length, hidden] and its LM head, without the full logits."""

    def __init__(self, causal_lm):
        self.model, self.head = causal_lm, LogitHead.of(causal_lm)
        self._capture = HiddenCapture(causal_lm)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The head runs on the last position only (an index tensor: see heal.distill.TeacherForward.hidden).
        last = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                   use_cache=False, logits_to_keep=last)
        return self._capture.take()


def ratio(rows: Sequence[Row]) -> float:
    """Σ sums / Σ counts: the token-weighted mean over rows."""
    return sum(total for total, _ in rows) / sum(count for _, count in rows)


def chunked_token_kl(hidden: torch.Tensor, reference_hidden: torch.Tensor, head: LogitHead,
                     reference_head: LogitHead, chunk_size: int) -> torch.Tensor:
    """KL(reference ‖ model) per position, fp32 [N], from final hidden states [N, hidden] of both models."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        log_p = torch.log_softmax(reference_head.logits(reference_hidden[rows]), dim=-1)  # [n, vocab] fp32
        log_q = torch.log_softmax(head.logits(hidden[rows]), dim=-1)
        out[rows] = (log_p.exp() * (log_p - log_q)).sum(-1)
    return out


def _row_sums(values: torch.Tensor, row_of: torch.Tensor, num_rows: int) -> list[Row]:
    """Per-position values [N] and their rows [N] -> (Σ, count) per row, in float64."""
    sums = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, row_of, values.double().cpu())
    counts = torch.bincount(row_of, minlength=num_rows)
    return list(zip(sums.tolist(), counts.tolist()))


# ---- KL to the reference, on the final assistant message -----------------------------------------------------


@dataclass(frozen=True)
class ResponseExample:
    input_ids: list[int]  # the whole conversation (or text)
    prompt_length: int  # tokens before the final assistant message (1 for a text row); the rest are response tokens


def encode_response_examples(tokenizer, rows: Sequence[ChatOrText], source: str = "instruct",
                             max_length: int | None = None) -> list[ResponseExample]:
    """Each row as (full ids, prompt length); the prompt must tokenize to a prefix of the full conversation,
    else "response tokens" would be meaningless. `source` names the rows in errors (e.g. the file). With
    `max_length`, a conversation is cut to its first max_length tokens (a response is scored on its
    start), and a row whose prompt alone fills them is left out: it has no response token to score. A plain-text
    row (a str) is encoded as the perplexity encodes it, and every token after its first is a response token."""
    examples, skipped = [], 0
    for index, messages in enumerate(rows):
        if isinstance(messages, str):
            examples.append(_text_example(tokenizer, messages, f"{source} row {index}", max_length))
            continue
        if messages[-1]["role"] != "assistant":
            raise EvalError(f"{source} row {index}: the last message must be the assistant's")
        prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        full = chat_ids(tokenizer, messages, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise EvalError(f"{source} row {index}: the chat template's prompt (add_generation_prompt=True) is not "
                            "a prefix of the full conversation's tokens, so the assistant's tokens cannot be located")
        if len(full) == len(prompt):
            raise EvalError(f"{source} row {index}: the assistant message has no tokens")
        if max_length is not None and len(prompt) >= max_length:
            skipped += 1
            continue
        examples.append(ResponseExample(full[:max_length], len(prompt)))
    if skipped:
        logger.info("%s: %d row(s) left out of the KL, their prompt alone has >= %d tokens", source, skipped,
                    max_length)
    if not examples:
        raise EvalError(f"{source}: no row has a response token within the first {max_length} tokens; "
                        "raise --max-length")
    return examples


def _text_example(tokenizer, text: str, where: str, max_length: int | None) -> ResponseExample:
    """A text row, with the tokenizer's usual special tokens and cut to max_length (encode_texts' encoding): its
    first token predicts the second, and so on to the end."""
    ids = tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
    if len(ids) < 2:
        raise EvalError(f"{where}: fewer than two tokens, so no token is predicted; drop the row")
    return ResponseExample(ids, 1)


def response_mask(prompt_lengths: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """[batch, width] bool over logit positions: position t predicts token t + 1, so the response tokens
    prompt_length..length−1 are predicted at positions prompt_length−1..length−2."""
    positions = torch.arange(width)
    starts = torch.tensor(prompt_lengths)[:, None] - 1
    ends = torch.tensor(lengths)[:, None] - 1
    return (positions >= starts) & (positions < ends)


def _response_hidden(backbone: Backbone, examples: Sequence[ResponseExample],
                     pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states at the positions predicting the response tokens, [N, hidden], and each one's row
    within `examples` [N] (on the CPU)."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in examples], pad, side="right")
    mask = response_mask([e.prompt_length for e in examples], [len(e.input_ids) for e in examples], input_ids.shape[1])
    row_of = torch.arange(len(examples))[:, None].expand_as(mask)[mask]
    return backbone.hidden(input_ids, attention_mask)[mask.to(backbone.device)], row_of


@dataclass(frozen=True)
class ReferenceStates:
    """The reference's LM head and, per example, its final hidden states at the response positions
    [response tokens, hidden] (on the CPU): all the KL needs of the reference, computed once."""

    head: LogitHead
    hidden: list[torch.Tensor]


@torch.inference_mode()
def reference_states(reference: Backbone, examples: Sequence[ResponseExample], pad: int,
                     batch_size: int = 8) -> ReferenceStates:
    hidden: list[torch.Tensor | None] = [None] * len(examples)
    batches = length_sorted_batches([e.input_ids for e in examples], batch_size)
    for batch in tqdm(batches, desc="reference states", unit="batch", dynamic_ncols=True):
        states, row_of = _response_hidden(reference, [examples[i] for i in batch], pad)
        for position, index in enumerate(batch):
            hidden[index] = states[row_of.to(states.device) == position].cpu()
    return ReferenceStates(reference.head, hidden)


@torch.inference_mode()
def kl_rows(backbone: Backbone, reference: ReferenceStates, examples: Sequence[ResponseExample], pad: int,
            batch_size: int = 8, chunk_size: int = 256) -> list[Row]:
    """(Σ KL(reference ‖ model) over the row's response tokens, their number) per example, in input order."""
    rows: list[Row | None] = [None] * len(examples)
    batches = length_sorted_batches([e.input_ids for e in examples], batch_size)
    for batch in tqdm(batches, desc="KL to the reference", unit="batch", dynamic_ncols=True):
        states, row_of = _response_hidden(backbone, [examples[i] for i in batch], pad)
        reference_hidden = torch.cat([reference.hidden[i] for i in batch]).to(states.device)  # the same row order
        kl = chunked_token_kl(states, reference_hidden, backbone.head, reference.head, chunk_size)
        for index, row in zip(batch, _row_sums(kl, row_of, len(batch))):
            rows[index] = row
    return rows


# ---- negative log-likelihood of text rows ----------------------------------------------------------------------


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each row with the tokenizer's usual special tokens, cut to max_length tokens; a row of n tokens predicts
    n − 1 of them, so a row of one token is an error (it would score nothing)."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    short = [index for index, ids in enumerate(encoded) if len(ids) < 2]
    if short:
        raise EvalError(f"--text rows {short[:5]}: fewer than two tokens, so nothing is predicted; drop them")
    return encoded


@torch.inference_mode()
def nll_rows(backbone: Backbone, encoded: Sequence[Sequence[int]], pad: int, batch_size: int = 8,
             chunk_size: int = 256) -> list[Row]:
    """(Σ −log p(token | prefix) over tokens 1.., their number) per row, in input order."""
    rows: list[Row | None] = [None] * len(encoded)
    for batch in tqdm(length_sorted_batches(encoded, batch_size), desc="perplexity", unit="batch", dynamic_ncols=True):
        input_ids, attention_mask = pad_batch([encoded[i] for i in batch], pad, side="right")
        predicts = attention_mask[:, 1:].bool()  # [batch, width − 1]: position t predicts token t + 1
        hidden = backbone.hidden(input_ids, attention_mask)[:, :-1][predicts.to(backbone.device)]  # [N, hidden]
        targets = input_ids[:, 1:][predicts].to(backbone.device)
        row_of = torch.arange(len(batch))[:, None].expand_as(predicts)[predicts]
        nll = -token_log_likelihoods(hidden, targets, backbone.head, chunk_size)
        for index, row in zip(batch, _row_sums(nll, row_of, len(batch))):
            rows[index] = row
    return rows
