"""lm-eval's HFLM, scoring each multiple-choice document's shared context once.

HFLM runs context + choice for every choice, so a 4-way question pays for its context 4 times (the demo's tasks:
13.6k tokens scored, 2.35k of them unique context). Here the contexts run once, left-padded in batches, and every
choice continues from a copy of its context's KV cache; the LM head runs only where a choice's tokens are
scored. The log-likelihoods are HFLM's (tests/test_evaluation.py compares them request by request); requests that
HFLM would truncate fall back to HFLM's own path.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from core.logits import HiddenCapture, LogitHead
from core.tokens import pad_batch

Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation) text, their token ids)


class SharedContextHFLM(HFLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hidden, self._head = HiddenCapture(self.model), LogitHead.of(self.model)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether it is the greedy one) per request, in request order."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # HFLM truncates (context + continuation)[:-1] to max_length from the left; such requests take its own path.
        truncated = [i for i, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) > self.max_length + 1]
        if truncated or self.backend != "causal":
            kept = truncated if self.backend == "causal" else list(range(len(requests)))
            for index, result in zip(kept, super()._loglikelihood_tokens([requests[i] for i in kept], disable_tqdm,
                                                                          override_bs)):
                results[index] = result
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, _) in enumerate(requests):
            if results[index] is None:
                by_context.setdefault(tuple(context), []).append(index)
        # The choices' forward dominates (contexts × choices rows, as wide as the longest choice): batch contexts
        # whose longest choices are alike, so little of it goes to padding.
        contexts = sorted(by_context, key=lambda c: max(len(requests[i][2]) for i in by_context[c]), reverse=True)
        batch = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        progress = tqdm(total=len(contexts), desc="lm-eval contexts", disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(contexts), batch):
            chunk = contexts[start:start + batch]
            scored = self._score_contexts(chunk, [[requests[i][2] for i in by_context[c]] for c in chunk])
            for context, scores in zip(chunk, scored):
                for index, result in zip(by_context[context], scores):
                    results[index] = result
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
            progress.update(len(chunk))
        progress.close()
        return results

    @torch.no_grad()
    def _score_contexts(self, contexts: list[tuple[int, ...]],
                        continuations: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """One forward over the left-padded contexts (their last position predicts every choice's first token),
        then the choices' remaining tokens, each row on a copy of its context's cache, in batches of rows of
        similar length (rows: contexts × choices, longest first)."""
        ids, mask = (t.to(self.device) for t in pad_batch(contexts, pad=0, side="left"))  # pads: masked out
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's tokens count from 0
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self._hidden.take()
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [contexts, vocab]
        rows = sorted(((row, choice, cont) for row, conts in enumerate(continuations) for choice, cont in
                       enumerate(conts)), key=lambda r: -len(r[2]))
        rows_per_batch = self.batch_size if isinstance(self.batch_size, int) else 8
        scores: list[list[tuple[float, bool] | None]] = [[None] * len(conts) for conts in continuations]
        for start in range(0, len(rows), rows_per_batch):
            batch = rows[start:start + rows_per_batch]
            hidden = self._continue(out.cache, batch, mask, positions)  # [rows, longest − 1, hidden] or None
            for k, (row, choice, cont) in enumerate(batch):
                tail = self._head.logits(hidden[k, :len(cont) - 1]) if hidden is not None else first[:0]
                logprobs = torch.cat([first[row:row + 1], F.log_softmax(tail, dim=-1)])  # [len(cont), vocab]
                tokens = torch.tensor(cont, device=self.device)
                likelihood = logprobs.gather(-1, tokens[:, None]).sum().item()
                scores[row][choice] = (likelihood, bool((logprobs.argmax(-1) == tokens).all()))
        return scores

    def _continue(self, context_cache, batch: list[tuple[int, int, list[int]]], mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor | None:
        """The final hidden states of each row's continuation after its first token, fed on a copy of its context's
        cache; None when every continuation is one token (its only score comes from the context's last position)."""
        rest = max(len(cont) for _, _, cont in batch) - 1
        if rest == 0:
            return None
        owner = torch.tensor([row for row, _, _ in batch], device=self.device)
        cache = copy.deepcopy(context_cache)
        cache.batch_select_indices(owner)
        ids = torch.zeros(len(batch), rest, dtype=torch.long, device=self.device)
        for k, (_, _, cont) in enumerate(batch):
            ids[k, :len(cont) - 1] = torch.tensor(cont[:-1], device=self.device)
        # Right padding of the continuations: a padded position comes after every real one, so it changes none.
        cont_positions = positions[owner, -1:] + 1 + torch.arange(rest, device=self.device)
        cont_mask = torch.cat([mask[owner], torch.ones_like(ids)], dim=1)
        # The head on one position only (an index tensor): the scored positions get it row by row, above.
        self.model(input_ids=ids, attention_mask=cont_mask, position_ids=cont_positions, cache=cache, use_cache=True,
                   logits_to_keep=torch.tensor([rest - 1], device=self.device))
        return self._hidden.take()
