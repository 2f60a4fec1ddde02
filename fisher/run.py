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

from .config import FisherConfig
from .data import Example
from .estimator import Accumulator, example_generator, per_example_log_likelihood, sample_labels

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


def run_fisher(model, accumulator: Accumulator, examples: list[Example], config: FisherConfig, pad_token_id: int,
               rank: int = 0, world_size: int = 1) -> Counts:
    """Accumulate this rank's share of the examples into `accumulator.sums`; return its counts."""
    mine = examples[rank::world_size]
    counts = Counts()
    device = next(model.parameters()).device
    total_tokens = sum(len(e.input_ids) for e in mine)
    progress = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"fisher[{rank}]", disable=rank != 0, dynamic_ncols=True)
    with accumulator.hooked(), progress:
        for start in range(0, len(mine), config.batch_size):
            batch = mine[start:start + config.batch_size]
            _fisher_batch(model, accumulator, batch, config, pad_token_id, device, counts)
            progress.update(sum(len(e.input_ids) for e in batch))  # tqdm shows tokens/s
    return counts


def _pad(batch: list[Example], pad_token_id: int, device: torch.device):
    """Right-padded input_ids, attention_mask and labels (-100 on padding), each [B, T]."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _fisher_batch(model, accumulator: Accumulator, batch: list[Example], config: FisherConfig, pad_token_id: int,
                  device: torch.device, counts: Counts) -> None:
    input_ids, attention_mask, labels = _pad(batch, pad_token_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    counts.examples += len(batch)
    counts.loss_tokens += int((labels[:, 1:] != -100).sum())
    for sample in range(config.num_samples):
        targets = labels if config.mode == "empirical" else _sampled_targets(logits, labels, batch, config.seed, sample)
        log_likelihood = per_example_log_likelihood(logits, targets)  # [B]
        finite_loss = log_likelihood.isfinite()
        with accumulator.backward_pass(include=finite_loss) as pass_:
            torch.where(finite_loss, log_likelihood, 0.0).sum().backward(retain_graph=True)
        if pass_.nonfinite.any():  # remove those examples from the modules that had already added them
            flagged = pass_.nonfinite
            with accumulator.correction({name: added & flagged for name, added in pass_.added.items()}):
                torch.where(flagged, log_likelihood, 0.0).sum().backward(retain_graph=True)
        skipped = ~finite_loss | pass_.nonfinite
        counts.pairs_nonfinite += int(skipped.sum())
        counts.pairs_used += len(batch) - int(skipped.sum())
        counts.nonfinite_examples += [batch[i].example_id for i in skipped.nonzero().flatten().tolist()]


def _sampled_targets(logits: torch.Tensor, labels: torch.Tensor, batch: list[Example], seed: int, sample: int) -> torch.Tensor:
    detached = logits.detach()
    return torch.stack([
        sample_labels(detached[row], labels[row], example_generator(seed, example.example_id, sample, logits.device))
        for row, example in enumerate(batch)
    ])


def reduce_counts(counts: Counts, accumulator: Accumulator, accelerator) -> Counts:
    """Sum every rank's fp32 sums (in place) and counts."""
    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return counts
    for name, total in accumulator.sums.items():
        accumulator.sums[name] = accelerator.reduce(total, reduction="sum")
    device = next(iter(accumulator.sums.values())).device
    numbers = torch.tensor([counts.examples, counts.pairs_used, counts.pairs_nonfinite, counts.loss_tokens], dtype=torch.float64, device=device)
    examples, used, nonfinite, tokens = (int(v) for v in accelerator.reduce(numbers, reduction="sum").tolist())
    ids = [i for part in gather_object([counts.nonfinite_examples]) for i in part]
    return Counts(examples, used, nonfinite, tokens, sorted(ids))


def finalize(accumulator: Accumulator, counts: Counts, config: FisherConfig) -> dict[str, torch.Tensor]:
    """Means from sums; fail when too many examples had non-finite gradients."""
    pairs = counts.pairs_used + counts.pairs_nonfinite
    if counts.pairs_nonfinite:
        logger.warning("%d of %d (example, sample) pairs had a non-finite loss or gradient and were skipped; examples: %s",
                       counts.pairs_nonfinite, pairs, [f"dataset {i >> 32} row {i & 0xFFFFFFFF}" for i in counts.nonfinite_examples[:10]])
    if pairs and counts.pairs_nonfinite / pairs > config.max_nonfinite_share:
        raise NonFiniteError(
            f"{counts.pairs_nonfinite} of {pairs} examples ({100 * counts.pairs_nonfinite / pairs:.1f}%) had non-finite "
            f"gradients, above max_nonfinite_share={config.max_nonfinite_share}. First: {counts.nonfinite_examples[:5]} "
            "(dataset index << 32 | row). Try dtype: float32, or a smaller max_length"
        )
    if counts.pairs_used == 0:
        raise NonFiniteError("no example contributed a finite gradient")
    return {name: total / counts.pairs_used for name, total in accumulator.sums.items()}

