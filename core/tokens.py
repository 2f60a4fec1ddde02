"""Token-level rules shared by the stages: which id pads, how token lists become a padded batch, which ids end a
generated turn, and whether two tokenizers index the same vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# End-of-turn tokens of common chat templates (ChatML, Gemma, Llama 3, Phi-3): generation stops at
# these as well as at the tokenizer's eos_token, since chat models often end a turn without EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def pad_id(tokenizer) -> int:
    # Padded positions are masked out everywhere, so any id does; EOS when the tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(sequences: Sequence[Sequence[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both [batch, longest], padded with `pad` on `side`
    ("left" for generation, "right" for scoring)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        span = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
        ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS and whichever known end-of-turn tokens its vocabulary has. Looked up in the
    vocabulary: convert_tokens_to_ids maps an unknown token to <unk>, which would then stop generation."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return sorted(set(ids))


def vocabulary_difference(tokenizer, reference) -> str | None:
    """How `tokenizer`'s vocabulary differs from `reference`'s (their sizes, and the lowest id whose token differs),
    or None when both map the same tokens to the same ids. Comparing two models' distributions token by token
    (a distillation KL, the evaluation's KL) needs None."""
    vocab, reference_vocab = tokenizer.get_vocab(), reference.get_vocab()
    if vocab == reference_vocab:
        return None
    token, index = min(set(vocab.items()) ^ set(reference_vocab.items()), key=lambda item: (item[1], item[0]))
    return f"{len(vocab)} tokens against {len(reference_vocab)}, first difference at id {index} ({token!r})"
