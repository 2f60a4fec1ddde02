"""Percentile-bootstrap confidence intervals for evaluation metrics, and paired intervals for differences.

A metric is a statistic of items (prompts, rows): `bootstrap_mean`, `bootstrap_ratio`, `bootstrap_statistic`,
and their `paired_*` forms for two models scored on the same items. At the same seed every interval over the
same items uses the very same resamples (`resample_chunks`). The method: docs/architecture.md, section
"Intervals: `evaluation/stats.py`".
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# At most this many resampled indices (int64, 8 bytes each) are held at once: [rows, num_items] chunks of the
# [num_resamples, num_items] index matrix, so memory stays near 80 MB for indices plus as much for gathered values.
_MAX_INDEX_ELEMENTS = 10_000_000

ArrayLike = Sequence[float] | np.ndarray
# Maps an index matrix [resamples, num_items] to one statistic per resample [resamples].
BatchStatistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval [low, high]."""

    estimate: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"Interval low {self.low} is above high {self.high}: pass the bounds in order.")

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        return not self.contains(0.0)

    def format(self, digits: int = 3) -> str:
        """"estimate [low, high]", all three with the same decimals: `digits` significant digits of the largest."""
        values = (self.estimate, self.low, self.high)
        if not all(math.isfinite(value) for value in values):
            return "{:.{d}g} [{:.{d}g}, {:.{d}g}]".format(*values, d=digits)
        largest = max(abs(value) for value in values)
        decimals = digits if largest == 0 else max(0, digits - 1 - math.floor(math.log10(largest)))
        # + 0.0 turns -0.0 into 0.0, so an exact zero never prints as "-0.000".
        estimate, low, high = (f"{value + 0.0:.{decimals}f}" for value in values)
        return f"{estimate} [{low}, {high}]"

    def __str__(self) -> str:
        return self.format()


def claim(name: str, interval: Interval, *, better: str | None = "lower", digits: int = 3) -> str:
    """The sentence a result states: the difference and its direction, or that none was measured.

    `interval` is a difference (say heal − raw) and `better` says which sign is an improvement for the metric
    ("lower", "higher", or None for a metric without one, like mean length). A difference is claimed only where
    its interval excludes 0:
        "heal − raw: loop_rate -0.310 [-0.400, -0.220]: lower (better)"
        "heal − raw: loop_rate 0.0100 [-0.0500, 0.0700]: no difference measured"
    """
    if better not in ("lower", "higher", None):
        raise ValueError(f"claim {name!r}: better={better!r}; pass 'lower', 'higher' or None.")
    if not interval.excludes_zero:
        verdict = "no difference measured"
    else:
        direction = "lower" if interval.high < 0 else "higher"
        verdict = direction if better is None else f"{direction} ({'better' if direction == better else 'worse'})"
    return f"{name} {interval.format(digits)}: {verdict}"


def bootstrap_mean(values: ArrayLike, *, num_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> Interval:
    """Mean of per-item values, e.g. loop_rate over prompts (0/1 each) or seq_rep_4 over continuations."""
    values = _as_items(values, "values")
    return _bootstrap(len(values), _mean_of(values), num_resamples=num_resamples, confidence=confidence, seed=seed)


def bootstrap_ratio(numerators: ArrayLike, denominators: ArrayLike, *,
                    transform: Callable[[float], float] | None = None, num_resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0) -> Interval:
    """Σ numerators / Σ denominators over resampled rows, e.g. per-row KL sums over per-row token counts.

    With `transform` (e.g. math.exp for perplexity from NLL sums) the estimate and both bounds are the transform
    of the ratio's: percentiles commute with a monotone transform, so this is the percentile interval of the
    transformed statistic (a decreasing transform swaps the bounds, which are put back in order).
    """
    numerators, denominators = _ratio_rows(numerators, denominators, "numerators", "denominators")
    interval = _bootstrap(len(numerators), _ratio_of(numerators, denominators), num_resamples=num_resamples,
                          confidence=confidence, seed=seed)
    if transform is None:
        return interval
    low, high = sorted((transform(interval.low), transform(interval.high)))
    return Interval(transform(interval.estimate), low, high)


def bootstrap_statistic(num_items: int, statistic: Callable[[np.ndarray], float], *, num_resamples: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> Interval:
    """Any statistic of a set of items, e.g. distinct-2 pooled over continuations.

    `statistic(indices)` gets an int array of item indices [num_items] (with repeats in a resample; np.arange for
    the estimate) and returns a float. It runs once per resample in Python, so keep it cheap.
    """
    _check_num_items(num_items)
    return _bootstrap(num_items, _per_resample(statistic, "statistic"), num_resamples=num_resamples,
                      confidence=confidence, seed=seed)


def paired_mean_difference(a: ArrayLike, b: ArrayLike, *, num_resamples: int = 2000, confidence: float = 0.95,
                           seed: int = 0) -> Interval:
    """mean(a) − mean(b), where a[i] and b[i] score the same item i and resamples take the same items for both."""
    a, b = _as_items(a, "a"), _as_items(b, "b")
    _check_same_items(len(a), len(b), "a", "b")
    return _bootstrap(len(a), _difference(_mean_of(a), _mean_of(b)), num_resamples=num_resamples,
                      confidence=confidence, seed=seed)


def paired_ratio_difference(num_a: ArrayLike, den_a: ArrayLike, num_b: ArrayLike, den_b: ArrayLike, *,
                            transform: Callable[[float], float] | None = None, num_resamples: int = 2000,
                            confidence: float = 0.95, seed: int = 0) -> Interval:
    """transform(Σnum_a/Σden_a) − transform(Σnum_b/Σden_b) over rows resampled jointly for a and b.

    Row i of a and of b is the same row; their denominators may differ (each is that model's token count). The
    transform applies to each model's ratio before the difference, per resample (e.g. perplexity difference).
    """
    num_a, den_a = _ratio_rows(num_a, den_a, "num_a", "den_a")
    num_b, den_b = _ratio_rows(num_b, den_b, "num_b", "den_b")
    _check_same_items(len(num_a), len(num_b), "num_a", "num_b")
    ratio_a, ratio_b = _ratio_of(num_a, den_a), _ratio_of(num_b, den_b)
    if transform is not None:
        ratio_a, ratio_b = _transformed(ratio_a, transform), _transformed(ratio_b, transform)
    return _bootstrap(len(num_a), _difference(ratio_a, ratio_b), num_resamples=num_resamples,
                      confidence=confidence, seed=seed)


def paired_statistic_difference(num_items: int, statistic_a: Callable[[np.ndarray], float],
                                statistic_b: Callable[[np.ndarray], float], *, num_resamples: int = 2000,
                                confidence: float = 0.95, seed: int = 0) -> Interval:
    """statistic_a(indices) − statistic_b(indices) on the same resampled items (see `bootstrap_statistic`)."""
    _check_num_items(num_items)
    batch = _difference(_per_resample(statistic_a, "statistic_a"), _per_resample(statistic_b, "statistic_b"))
    return _bootstrap(num_items, batch, num_resamples=num_resamples, confidence=confidence, seed=seed)


def _bootstrap(num_items: int, batch_statistic: BatchStatistic, *, num_resamples: int, confidence: float,
               seed: int) -> Interval:
    """The statistic on all items, and its percentile interval over the shared resamples."""
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples}; pass at least 1 (2000 is the default).")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; pass a level strictly between 0 and 1, e.g. 0.95.")
    estimate = float(batch_statistic(np.arange(num_items)[None, :])[0])
    resampled = np.concatenate([batch_statistic(indices)
                                for indices in resample_chunks(num_items, num_resamples, seed)])
    low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(estimate, float(low), float(high))


def resample_chunks(num_items: int, num_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The [num_resamples, num_items] matrix of resampled item indices, in chunks of rows.

    The rows are drawn in order from one generator seeded by `seed`, and drawing a chunk of rows draws the same
    numbers as drawing them one matrix at a time, so the indices depend on (num_items, num_resamples, seed) only,
    not on the chunk size or on which statistic consumes them.
    """
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_INDEX_ELEMENTS // num_items)
    for start in range(0, num_resamples, rows_per_chunk):
        yield rng.integers(0, num_items, size=(min(rows_per_chunk, num_resamples - start), num_items))


def _mean_of(values: np.ndarray) -> BatchStatistic:
    return lambda indices: values[indices].sum(axis=1) / indices.shape[1]


def _ratio_of(numerators: np.ndarray, denominators: np.ndarray) -> BatchStatistic:
    # Every denominator is > 0 (checked in _ratio_rows), so no resample's sum is 0.
    return lambda indices: numerators[indices].sum(axis=1) / denominators[indices].sum(axis=1)


def _difference(batch_a: BatchStatistic, batch_b: BatchStatistic) -> BatchStatistic:
    return lambda indices: batch_a(indices) - batch_b(indices)


def _transformed(batch: BatchStatistic, transform: Callable[[float], float]) -> BatchStatistic:
    # transform is a scalar function (math.exp), applied per resample: a few thousand calls, a millisecond.
    return lambda indices: np.array([transform(float(value)) for value in batch(indices)])


def _per_resample(statistic: Callable[[np.ndarray], float], name: str) -> BatchStatistic:
    """A batch statistic that calls the scalar `statistic` on each row of item indices."""
    def batch(indices: np.ndarray) -> np.ndarray:
        values = np.array([float(statistic(row)) for row in indices])
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"{name} returned {values[bad[0]]} on item indices {indices[bad[0]].tolist()}: it must "
                             f"return a finite float on any resample (with repeats) of the items.")
        return values
    return batch


def _as_items(values: ArrayLike, name: str) -> np.ndarray:
    """`values` as a finite 1-D float64 array of at least one item; else an error naming the bad item."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape}; pass one number per item (a 1-D sequence).")
    if array.size == 0:
        raise ValueError(f"{name} is empty: an interval needs at least one item.")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is {array[bad[0]]}: every item must be a finite number "
                         f"({bad.size} non-finite in all); drop or fix that item.")
    return array


def _ratio_rows(numerators: ArrayLike, denominators: ArrayLike, num_name: str,
                den_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row numerators and positive denominators of equal length."""
    numerators, denominators = _as_items(numerators, num_name), _as_items(denominators, den_name)
    _check_same_items(len(numerators), len(denominators), num_name, den_name)
    bad = np.flatnonzero(denominators <= 0)
    if bad.size:
        raise ValueError(f"{den_name}[{bad[0]}] is {denominators[bad[0]]}: every row needs a positive denominator "
                         f"(a row without tokens carries no information); leave such rows out.")
    return numerators, denominators


def _check_same_items(len_a: int, len_b: int, name_a: str, name_b: str) -> None:
    if len_a != len_b:
        raise ValueError(f"{name_a} has {len_a} items and {name_b} has {len_b}: a paired interval needs the same "
                         f"items in both, in the same order.")


def _check_num_items(num_items: int) -> None:
    if num_items < 1:
        raise ValueError(f"num_items={num_items}: an interval needs at least one item.")
