"""Pure metrics on token sequences: seq-rep-n, distinct-n and the loop test (defined in docs/architecture.md,
section "Metrics")."""

from __future__ import annotations

from collections.abc import Sequence


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


def ends_in_loop(tokens: Sequence[int], stopped: bool, max_period: int = 16, min_repeats: int = 3,
                 min_tail: int = 12) -> bool:
    """Whether a continuation ends in a loop: generation was cut off (`stopped` is False: no stop token
    within the cap) and, for some period p in 1..max_period, its last L = max(min_repeats·p, min_tail) tokens
    are periodic: tail[j] == tail[j − p] for every p ≤ j < L, so the tail holds at least min_repeats copies
    of a p-token unit. A sequence shorter than L cannot loop with period p. A continuation that stopped by
    itself is never a loop, however repetitive."""
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
