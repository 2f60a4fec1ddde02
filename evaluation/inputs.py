"""From input files to token batches: the JSONL readers (row formats in `python -m evaluation --help`), chat
templating (or none, for plain-text rows), and length-sorted batches (padding: core.tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.files import JsonlError, read_jsonl
from evaluation.config import EvalError

Messages = list[dict[str, str]]
# A prompt or a KL row: chat messages (rendered with the chat template), or plain text (a {"text"} row), fed as the
# tokenizer encodes it with no template: what a base model, which has none, is given.
ChatOrText = Messages | str


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    """The first `limit` rows of a JSONL input; a missing or malformed file is an EvalError naming the line."""
    try:
        return read_jsonl(path)[:limit]
    except JsonlError as error:
        raise EvalError(str(error)) from None


def _check_messages(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise EvalError(f"{where}: expected a non-empty list of messages")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise EvalError(f"{where}: every message needs a string 'role' and 'content', got {message!r}")
    return messages


def load_prompts(path: Path, limit: int | None = None) -> list[ChatOrText]:
    """Chat prompts, each ending before the assistant's turn: {"prompt": "text"}, {"prompt": [messages]} or
    {"messages": [messages]} rows, trailing assistant turns dropped (so a chat file can serve as prompts); or
    plain-text prompts, {"text": "..."} rows, continued as they are (no chat template)."""
    return _chat_or_text_rows(path, limit, _chat_prompt)


def load_instruct(path: Path, limit: int | None = None) -> list[ChatOrText]:
    """Held-out rows for the KL: TRL "messages" rows whose last message is the assistant's, or conversational
    prompt/completion rows (read as prompt + completion), scored on the final assistant message; or {"text"} rows
    (plain text, a base model's held-out data), scored on every token."""
    return _chat_or_text_rows(path, limit, _chat_response)


def _chat_or_text_rows(path: Path, limit: int | None, parse_chat) -> list[ChatOrText]:
    """Each row's text if it is a plain-text row, else `parse_chat(row, where)`'s messages."""
    return [row["text"] if _is_text_row(row) else parse_chat(row, f"{path} row {index}")
            for index, row in enumerate(_read_rows(path, limit))]


def _is_text_row(row: dict) -> bool:
    """A plain-text row: a string "text" field and no chat field (a chat row may carry other fields)."""
    return isinstance(row.get("text"), str) and not {"prompt", "messages", "completion"} & set(row)


def _chat_prompt(row: dict, where: str) -> Messages:
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    if "prompt" not in row and "messages" not in row:
        raise EvalError(f"{where}: expected a 'prompt', 'messages' or 'text' field, got {sorted(row)}")
    messages = list(_check_messages(row.get("prompt", row.get("messages")), where))
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise EvalError(f"{where}: no message before the assistant's")
    return messages


def _chat_response(row: dict, where: str) -> Messages:
    conversational = isinstance(row.get("completion"), list) and isinstance(row.get("prompt"), list)
    messages = _check_messages(row["prompt"] + row["completion"] if conversational else row.get("messages"), where)
    if messages[-1]["role"] != "assistant":
        raise EvalError(f"{where}: the last message must be the assistant's, got role {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise EvalError(f"{where}: an assistant message needs a prompt before it")
    return messages


def load_texts(path: Path, limit: int | None = None) -> list[str]:
    """{"text": "..."} rows, for the perplexity."""
    texts = []
    for index, row in enumerate(_read_rows(path, limit)):
        if not isinstance(row.get("text"), str):
            raise EvalError(f"{path} row {index}: expected a string 'text' field")
        texts.append(row["text"])
    return texts


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes any BOS itself; letting the tokenizer add special tokens would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: ChatOrText) -> list[int]:
    """A chat prompt through the chat template, ready for the assistant's turn; a plain-text prompt as the tokenizer
    encodes it, with its usual special tokens (a BOS) and no template."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def prompt_text(prompt: ChatOrText) -> str:
    """What a report shows of a prompt: the plain text, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def length_sorted_batches(sequences: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Indices of `sequences` in batches of at most `size`, longest first: rows of similar length share a
    batch, so little compute goes to padding. Callers put results back in input order by these indices."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]
