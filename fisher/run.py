"""Compute the diagonal Fisher of a model on instruction data, on one process or many.

F(θ) = mean over examples (and, in `true` mode, over label samples) of (∂ℓ/∂θ)², where ℓ is one
example's summed log-likelihood over its loss tokens. Under accelerate each rank takes every
world_size-th example; the fp32 sums and counts are reduced once at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from core.logits import LogitHead, sample_tokens_chunked
from core.tokens import pad_batch

from .config import FisherConfig
from .data import Example
from .estimator import Accumulator, example_generator, label_uniforms, layer_groups, per_example_log_likelihood

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Counts:
    examples: int = 0  # examples seen on this rank
    pairs_used: int = 0  # (example, label sample) pairs whose gradients were added
    pairs_nonfinite: int = 0  # pairs skipped for a non-finite loss or gradient
    loss_tokens: int = 0  # loss tokens of the examples seen
    nonfinite_examples: list[int] = field(default_factory=list)  # example ids, for the log


Pairs = dict[tuple[int, int], torch.Tensor]  # (batch index, label sample) -> [B] bool, one flag per example


def prepare_for_fisher(model, config: FisherConfig) -> None:
    """Ready a loaded model for `run_fisher`: freeze every weight (no weight gradients are built; hooks compute
    per-example ones) and let gradients flow from the token embeddings, so every decoder Linear sees its output
    gradient."""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, output: output.requires_grad_(True))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode; these models have no active dropout
    else:
        model.eval()


def run_fisher(model, accumulator: Accumulator, examples: list[Example], config: FisherConfig, pad_token_id: int,
               rank: int = 0, world_size: int = 1) -> Counts:
    """Accumulate this rank's share of the examples into `accumulator.sums`; return its counts.

    With layer_groups > 1 the data is run once per contiguous group of decoder layers, hooking only that
    group's Linears. A (example, sample) pair must then be left out of every group or of none: a pair a later
    group finds non-finite is subtracted again from the earlier groups, by rerunning its batch."""
    mine = examples[rank::world_size]
    batches = [mine[start:start + config.batch_size] for start in range(0, len(mine), config.batch_size)]
    groups = layer_groups(model, accumulator.modules, config.layer_groups)
    run = _Run(model, LogitHead.of(model), accumulator, config, pad_token_id, next(model.parameters()).device)
    skipped: Pairs = {}  # pairs left out of every group's sums
    total_tokens = len(groups) * sum(len(e.input_ids) for e in mine)
    progress = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"fisher[{rank}]", disable=rank != 0,
                    dynamic_ncols=True)
    with progress:
        for index, group in enumerate(groups):
            found: Pairs = {}  # pairs this group left out that the earlier groups added
            with accumulator.hooked(group, offload=len(groups) > 1):
                for b, batch in enumerate(batches):
                    excluded = {s: rows for (i, s), rows in skipped.items() if i == b}
                    found.update({(b, s): rows for s, rows in run.accumulate(batch, excluded).items() if rows.any()})
                    progress.update(sum(len(e.input_ids) for e in batch))  # tqdm shows tokens/s
            for earlier in groups[:index] if found else []:
                with accumulator.hooked(earlier, offload=True):
                    for b in sorted({b for b, _ in found}):
                        run.subtract(batches[b], {s: rows for (i, s), rows in found.items() if i == b})
            for key, rows in found.items():
                skipped[key] = rows | skipped[key] if key in skipped else rows
    return _counts(mine, batches, skipped, config.num_samples)


def _counts(mine: list[Example], batches: list[list[Example]], skipped: Pairs, num_samples: int) -> Counts:
    ids = [batches[b][row].example_id  # in the order of batches, then samples
           for (b, _), rows in sorted(skipped.items()) for row in rows.nonzero().flatten().tolist()]
    loss_tokens = sum(sum(label != -100 for label in e.labels[1:]) for e in mine)
    return Counts(examples=len(mine), pairs_used=len(mine) * num_samples - len(ids), pairs_nonfinite=len(ids),
                  loss_tokens=loss_tokens, nonfinite_examples=ids)


def pad_examples(batch: list[Example], pad_token_id: int, device: torch.device):
    """Right-padded input_ids, attention_mask and labels (-100 on padding), each [B, T]."""
    input_ids, attention_mask = pad_batch([e.input_ids for e in batch], pad_token_id, side="right")
    labels, _ = pad_batch([e.labels for e in batch], -100, side="right")
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


@dataclass
class _Run:
    model: torch.nn.Module
    head: LogitHead
    accumulator: Accumulator
    config: FisherConfig
    pad_token_id: int
    device: torch.device

    def _forward(self, batch: list[Example]):
        """The backbone's final hidden states [B, T, hidden] (no LM head: it runs in chunks later), labels [B, T]."""
        input_ids, attention_mask, labels = pad_examples(batch, self.pad_token_id, self.device)
        self.accumulator.positions = attention_mask.bool()  # the K-FAC factors count non-padding positions only
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, labels

    def _log_likelihood(self, hidden, labels, batch: list[Example], sample: int) -> torch.Tensor:
        """ℓ per example [B] for one label sample: the data's labels, or (`true` mode) labels drawn from the model."""
        targets = labels if self.config.mode == "empirical" else self._sampled_targets(hidden, labels, batch, sample)
        return per_example_log_likelihood(hidden, targets, self.head, self.config.logit_chunk_size)

    def _sampled_targets(self, hidden, labels, batch: list[Example], sample: int) -> torch.Tensor:
        """Labels drawn at each loss position from the model's predictive distribution there (teacher-forced on
        the data prefix), from a generator per (seed, example, sample): independent of batching, rank, chunking."""
        generators = [example_generator(self.config.seed, e.example_id, sample, self.device) for e in batch]
        # Row-major, as `mask`.
        uniforms = torch.cat([label_uniforms(labels[row], g) for row, g in enumerate(generators)])
        mask = labels[:, 1:] != -100
        sampled = labels.clone()
        sampled[:, 1:][mask] = sample_tokens_chunked(hidden.detach()[:, :-1][mask], uniforms, self.head,
                                                     self.config.logit_chunk_size)
        return sampled

    def accumulate(self, batch: list[Example], excluded: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Add the batch's pairs (except `excluded` [B] per sample) to the hooked modules' sums; return, per
        sample, the examples newly left out for a non-finite loss or gradient [B]."""
        hidden, labels = self._forward(batch)
        skipped = {}
        for sample in range(self.config.num_samples):
            log_likelihood = self._log_likelihood(hidden, labels, batch, sample)  # [B]
            known = excluded.get(sample, torch.zeros_like(log_likelihood, dtype=torch.bool))
            finite_loss = log_likelihood.isfinite()
            include = finite_loss & ~known
            with self.accumulator.backward_pass(include=include) as pass_:
                torch.where(include, log_likelihood, 0.0).sum().backward(retain_graph=True)
            if pass_.nonfinite.any():  # remove those examples from the modules that had already added them
                flagged = pass_.nonfinite
                with self.accumulator.correction({name: added & flagged for name, added in pass_.added.items()}):
                    torch.where(flagged, log_likelihood, 0.0).sum().backward(retain_graph=True)
            skipped[sample] = (~finite_loss | pass_.nonfinite) & ~known
        return skipped

    def subtract(self, batch: list[Example], rows: dict[int, torch.Tensor]) -> None:
        """Subtract from every hooked module what `accumulate` added for the examples `rows` [B] per sample:
        the same batch, so the same computation, gives the same per-example squares."""
        hidden, labels = self._forward(batch)
        for sample, flagged in rows.items():
            log_likelihood = self._log_likelihood(hidden, labels, batch, sample)
            with self.accumulator.correction({name: flagged for name in self.accumulator.modules}):
                torch.where(flagged, log_likelihood, 0.0).sum().backward(retain_graph=True)


def reduce_counts(counts: Counts, accumulator: Accumulator, accelerator) -> Counts:
    """Sum every rank's fp32 sums, K-FAC sums and token counts included (in place), and counts."""
    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return counts
    factors = accumulator.factors
    for sums in [accumulator.sums] + ([factors.inputs, factors.outputs, factors.tokens] if factors else []):
        for name, total in sums.items():  # one at a time on the device (after a per-layer-group pass, on CPU)
            sums[name] = accelerator.reduce(total.to(accelerator.device), reduction="sum").to(total.device)
    device = next(iter(accumulator.sums.values())).device
    numbers = torch.tensor([counts.examples, counts.pairs_used, counts.pairs_nonfinite, counts.loss_tokens],
                           dtype=torch.float64, device=device)
    examples, used, nonfinite, tokens = (int(v) for v in accelerator.reduce(numbers, reduction="sum").tolist())
    ids = [i for part in gather_object([counts.nonfinite_examples]) for i in part]
    return Counts(examples, used, nonfinite, tokens, sorted(ids))


def finalize(accumulator: Accumulator, counts: Counts, config: FisherConfig) -> dict[str, torch.Tensor]:
    """Means from sums; fail when too many examples had non-finite gradients."""
    pairs = counts.pairs_used + counts.pairs_nonfinite
    if counts.pairs_nonfinite:
        examples = [f"dataset {i >> 32} row {i & 0xFFFFFFFF}" for i in counts.nonfinite_examples[:10]]
        logger.warning("%d of %d (example, sample) pairs had a non-finite loss or gradient and were skipped; "
                       "examples: %s", counts.pairs_nonfinite, pairs, examples)
    if pairs and counts.pairs_nonfinite / pairs > config.max_nonfinite_share:
        raise NonFiniteError(
            f"{counts.pairs_nonfinite} of {pairs} examples ({100 * counts.pairs_nonfinite / pairs:.1f}%) had "
            f"non-finite gradients, above max_nonfinite_share={config.max_nonfinite_share}. "
            f"First: {counts.nonfinite_examples[:5]} "
            "(dataset index << 32 | row). Try dtype: float32, or a smaller max_length"
        )
    if counts.pairs_used == 0:
        raise NonFiniteError("no example contributed a finite gradient")
    return {name: total / counts.pairs_used for name, total in accumulator.sums.items()}

