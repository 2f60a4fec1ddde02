"""Greedy continuations of prompts (chat or plain text): natural-stop ones (cut at a stop token or the cap) and
length-controlled ones (exactly N tokens, every stop token suppressed until then), both from one `generate` run per
batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from core.tokens import pad_batch, pad_id, stop_token_ids
from evaluation.inputs import ChatOrText, length_sorted_batches, prompt_ids


@dataclass(frozen=True)
class Continuation:
    tokens: list[int]  # generated tokens, the stop token excluded
    stopped: bool  # True if generation ended at a stop token, False if it ran to the cap


@dataclass(frozen=True)
class Continuations:
    natural: list[Continuation]  # at most max_new_tokens each, cut at the first stop token
    fixed: list[Continuation]  # exactly fixed_new_tokens each (stopped is always False); empty when it is 0


class _NaturalStopThenSuppress(LogitsProcessor):
    """Records, per row, the first step whose greedy choice is a stop token (where the natural-stop continuation
    ends), then masks the stop tokens while fewer than `fixed` tokens exist (where the fixed-length one goes on).
    Up to its natural stop a row's greedy choice is the same with or without the mask (the argmax is no stop
    token), so one run yields both continuations: the natural one is the prefix before its stop."""

    def __init__(self, stops: torch.Tensor, prompt_width: int, fixed: int, batch: int):
        self.stops, self.prompt_width, self.fixed = stops, prompt_width, fixed
        self.natural_end = torch.full((batch,), -1, dtype=torch.long)  # step of the natural stop; −1: none yet

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        chose_stop = torch.isin(scores.argmax(dim=-1), self.stops).cpu()  # [batch]
        self.natural_end[(self.natural_end < 0) & chose_stop] = step
        if step < self.fixed:
            scores = scores.index_fill(1, self.stops, -torch.inf)
        return scores


class _BothDone(StoppingCriteria):
    """A row is done once it has its fixed-length tokens and its natural continuation has ended."""

    def __init__(self, recorder: _NaturalStopThenSuppress, cap: int):
        self.recorder, self.cap = recorder, cap

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        length = input_ids.shape[1] - self.recorder.prompt_width
        natural_done = (self.recorder.natural_end >= 0) | (length >= self.cap)
        return (natural_done & (length >= self.recorder.fixed)).to(input_ids.device)


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompts: Sequence[ChatOrText], max_new_tokens: int = 160,
                         fixed_new_tokens: int = 0, batch_size: int = 32) -> Continuations:
    """Greedy decoding of each prompt (a chat prompt through the chat template with add_generation_prompt=True, a
    plain-text one as the tokenizer encodes it: inputs.prompt_ids) in left-padded batches of similar length; left
    padding keeps every prompt's last token in the last column, where generation continues. Results come back in
    prompt order."""
    stops, pad = stop_token_ids(tokenizer), pad_id(tokenizer)
    encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    natural: list[Continuation | None] = [None] * len(encoded)
    fixed: list[Continuation | None] = [None] * len(encoded)
    progress = tqdm(total=len(encoded), desc="generate", unit="prompt", dynamic_ncols=True)
    for batch in length_sorted_batches(encoded, batch_size):
        input_ids, attention_mask = pad_batch([encoded[i] for i in batch], pad, side="left")
        recorder = _NaturalStopThenSuppress(torch.tensor(stops, device=model.device), input_ids.shape[1],
                                            fixed_new_tokens, len(batch))
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
            max_new_tokens=max(max_new_tokens, fixed_new_tokens), do_sample=False, num_beams=1,
            eos_token_id=stops, pad_token_id=pad, logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([_BothDone(recorder, max_new_tokens)]),
            # transformers 5 fills whatever is not passed from the checkpoint's generation_config.json: switch off
            # the anti-repetition settings some ship with, since repetition is what these metrics measure.
            repetition_penalty=1.0, no_repeat_ngram_size=0,
        )  # [batch, prompt width + generated]; a finished row is filled with `pad`
        for index, row, end in zip(batch, output[:, input_ids.shape[1]:].tolist(), recorder.natural_end.tolist()):
            stopped = 0 <= end < max_new_tokens
            natural[index] = Continuation(row[:end] if stopped else row[:max_new_tokens], stopped)
            if fixed_new_tokens:
                fixed[index] = Continuation(row[:fixed_new_tokens], stopped=False)
        progress.update(len(batch))
    progress.close()
    return Continuations(natural, fixed if fixed_new_tokens else [])
