"""evaluation/stats.py: bootstrap intervals on hand-made data with known answers, paired differences (a model
against itself is exactly 0, and pairing is what makes it so), shared resamples, transforms, and bad input."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from evaluation import stats
from evaluation.stats import (
    Interval,
    bootstrap_mean,
    bootstrap_ratio,
    bootstrap_statistic,
    claim,
    paired_mean_difference,
    paired_ratio_difference,
    paired_statistic_difference,
)


def _values(n: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 0.5, size=n)


def _degenerate(interval: Interval, value: float) -> bool:
    return interval.estimate == interval.low == interval.high == value


# --- known answers


def test_equal_values_give_a_degenerate_interval():
    assert _degenerate(bootstrap_mean([0.25] * 50), 0.25)
    assert _degenerate(bootstrap_ratio([3.0] * 40, [2.0] * 40), 1.5)


def test_single_item_collapses_to_the_estimate():
    assert _degenerate(bootstrap_mean([0.7]), 0.7)
    assert _degenerate(bootstrap_ratio([6.0], [4.0]), 1.5)
    assert _degenerate(bootstrap_statistic(1, lambda indices: 2.0 * len(indices)), 2.0)


def test_bernoulli_mean_matches_the_normal_approximation():
    p, n = 0.3, 2000
    draws = (np.random.default_rng(20240).random(n) < p).astype(np.float64)
    interval = bootstrap_mean(draws)
    assert interval.estimate == pytest.approx(draws.mean(), abs=1e-15)
    assert interval.contains(p)
    expected_half_width = 1.96 * math.sqrt(p * (1 - p) / n)  # 0.0201
    assert (interval.high - interval.low) / 2 == pytest.approx(expected_half_width, rel=0.15)


def test_ratio_is_token_weighted_not_a_mean_of_row_ratios():
    interval = bootstrap_ratio([10.0, 0.0, 0.0, 0.0], [10.0, 1.0, 1.0, 1.0])
    assert interval.estimate == pytest.approx(10 / 13, abs=1e-15)  # the mean of row ratios would be 0.25


def test_ratio_with_unit_denominators_equals_the_mean_on_the_same_resamples():
    values = _values()
    assert bootstrap_ratio(values, np.ones_like(values)) == bootstrap_mean(values)


def test_generic_statistic_uses_the_same_resamples_as_the_mean():
    values = _values()
    generic = bootstrap_statistic(len(values), lambda indices: values[indices].mean())
    assert generic == bootstrap_mean(values)


def test_wider_confidence_gives_a_wider_interval():
    values = _values()
    narrow, wide = bootstrap_mean(values, confidence=0.5), bootstrap_mean(values, confidence=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


# --- paired differences


def test_model_against_itself_is_exactly_zero():
    values, tokens = _values(), np.random.default_rng(1).integers(1, 30, size=256).astype(np.float64)
    for interval in (
        paired_mean_difference(values, values),
        paired_ratio_difference(values, tokens, values, tokens),
        paired_ratio_difference(values, tokens, values, tokens, transform=math.exp),
        paired_statistic_difference(len(values), lambda i: values[i].std(), lambda i: values[i].std()),
    ):
        assert _degenerate(interval, 0.0)
        assert interval.contains(0.0) and not interval.excludes_zero


def test_unpaired_resampling_would_not_give_zero_for_identical_inputs():
    # Negative control for the test above: the same statistic with independent resamples for "a" and "b" (what
    # two separately bootstrapped models would give) spreads around 0; only the joint resampling is exact.
    values, num_resamples = _values(), 2000
    means = {seed: np.concatenate([values[indices].mean(axis=1)
                                   for indices in stats.resample_chunks(len(values), num_resamples, seed)])
             for seed in (0, 1)}
    unpaired = np.quantile(means[0] - means[1], [0.025, 0.975])
    assert unpaired[0] < -0.05 and unpaired[1] > 0.05
    joint = np.quantile(means[0] - means[0], [0.025, 0.975])
    assert (joint == 0).all()


def test_constant_shift_gives_exactly_that_difference():
    values, shift = _values(), 0.1
    interval = paired_mean_difference(values, values + shift)
    for bound in (interval.estimate, interval.low, interval.high):
        assert bound == pytest.approx(-shift, abs=1e-12)


def test_pairing_resolves_a_difference_that_unpaired_intervals_do_not():
    rng = np.random.default_rng(7)
    difficulty = rng.normal(0.0, 1.0, size=200)  # shared by both models: most of the spread
    a = difficulty + rng.normal(0.0, 0.05, size=200)
    b = difficulty + 0.05 + rng.normal(0.0, 0.05, size=200)
    interval_a, interval_b = bootstrap_mean(a), bootstrap_mean(b)
    assert interval_a.low < interval_b.high and interval_b.low < interval_a.high  # the unpaired CIs overlap
    paired = paired_mean_difference(a, b)
    assert paired.excludes_zero and paired.high < 0
    assert paired.contains(-0.05)


def test_paired_ratio_difference_allows_different_denominators():
    num_a, den_a = np.array([4.0, 6.0, 2.0]), np.array([2.0, 3.0, 1.0])
    num_b, den_b = np.array([3.0, 3.0, 3.0]), np.array([1.0, 2.0, 3.0])
    interval = paired_ratio_difference(num_a, den_a, num_b, den_b)
    assert interval.estimate == pytest.approx(12 / 6 - 9 / 6, abs=1e-15)
    with_exp = paired_ratio_difference(num_a, den_a, num_b, den_b, transform=math.exp)
    assert with_exp.estimate == pytest.approx(math.exp(2.0) - math.exp(1.5), abs=1e-12)


# --- resamples: determinism, sharing, chunking


def test_same_seed_is_identical_and_different_seeds_differ():
    values = _values()
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    assert bootstrap_mean(values, seed=3) != bootstrap_mean(values, seed=4)


def test_chunking_does_not_change_the_resamples(monkeypatch):
    values = _values(100)
    whole = bootstrap_mean(values, num_resamples=500)
    monkeypatch.setattr(stats, "_MAX_INDEX_ELEMENTS", 300)  # 3 resamples a chunk
    assert len(list(stats.resample_chunks(100, 500, 0))) == 167
    assert bootstrap_mean(values, num_resamples=500) == whole


def test_many_resamples_over_hundreds_of_items_take_milliseconds():
    values = _values(256)
    elapsed = []
    for _ in range(3):
        start = time.perf_counter()
        bootstrap_mean(values, num_resamples=2000)
        elapsed.append(time.perf_counter() - start)
    assert min(elapsed) < 0.25  # about 0.02 s unloaded


# --- transforms


def test_perplexity_interval_is_exp_of_the_log_scale_interval():
    rng = np.random.default_rng(5)
    tokens = rng.integers(5, 40, size=128).astype(np.float64)
    nll_sums = tokens * rng.uniform(1.5, 3.5, size=128)
    log_scale = bootstrap_ratio(nll_sums, tokens)
    perplexity = bootstrap_ratio(nll_sums, tokens, transform=math.exp)
    assert perplexity == Interval(math.exp(log_scale.estimate), math.exp(log_scale.low), math.exp(log_scale.high))


def test_decreasing_transform_keeps_the_bounds_in_order():
    values = _values()
    ratio = bootstrap_ratio(values, np.ones_like(values))
    negated = bootstrap_ratio(values, np.ones_like(values), transform=lambda x: -x)
    assert negated == Interval(-ratio.estimate, -ratio.high, -ratio.low)


# --- Interval and claim


def test_interval_format():
    assert str(Interval(0.123, 0.1, 0.15)) == "0.123 [0.100, 0.150]"
    assert str(Interval(12.345, 11.9, 13.1)) == "12.3 [11.9, 13.1]"
    assert Interval(-0.00031, -0.001, 0.0005).format(2) == "-0.0003 [-0.0010, 0.0005]"
    assert str(Interval(-0.0, -0.0, 0.0)) == "0.000 [0.000, 0.000]"
    assert str(Interval(math.inf, 1.0, math.inf)) == "inf [1, inf]"


def test_interval_contains_and_excludes_zero():
    interval = Interval(-0.31, -0.40, -0.22)
    assert interval.contains(-0.40) and interval.contains(-0.22) and not interval.contains(0.0)
    assert interval.excludes_zero
    assert not Interval(0.0, -0.1, 0.1).excludes_zero
    with pytest.raises(ValueError, match="low 0.2 is above high 0.1"):
        Interval(0.15, 0.2, 0.1)


def test_claim_states_a_difference_only_where_the_interval_excludes_zero():
    lower = Interval(-0.31, -0.40, -0.22)
    assert claim("heal − raw: loop_rate", lower) == "heal − raw: loop_rate -0.310 [-0.400, -0.220]: lower (better)"
    assert claim("heal − raw: distinct_2", lower, better="higher").endswith(": lower (worse)")
    assert claim("heal − raw: mean_length", Interval(5.0, 2.0, 8.0), better=None).endswith("8.00]: higher")
    assert claim("x", Interval(0.01, -0.05, 0.07)) == "x 0.0100 [-0.0500, 0.0700]: no difference measured"
    with pytest.raises(ValueError, match="better='smaller'"):
        claim("x", lower, better="smaller")


# --- bad input


@pytest.mark.parametrize(("call", "message"), [
    (lambda: bootstrap_mean([]), "values is empty"),
    (lambda: bootstrap_mean([1.0, 2.0, math.nan, 4.0]), r"values\[2\] is nan"),
    (lambda: bootstrap_mean([[1.0, 2.0]]), r"values has shape \(1, 2\)"),
    (lambda: bootstrap_ratio([1.0, 2.0], [3.0, math.inf]), r"denominators\[1\] is inf"),
    (lambda: bootstrap_ratio([1.0, 2.0, 3.0], [3.0, 0.0, 2.0]), r"denominators\[1\] is 0.0.*without tokens"),
    (lambda: bootstrap_ratio([1.0, 2.0], [3.0]), "numerators has 2 items and denominators has 1"),
    (lambda: paired_mean_difference([1.0, 2.0, 3.0], [1.0, 2.0]), "a has 3 items and b has 2"),
    (lambda: paired_ratio_difference([1.0], [1.0], [1.0, 2.0], [1.0, 1.0]), "num_a has 1 items and num_b has 2"),
    (lambda: paired_ratio_difference([1.0], [1.0], [1.0], [-1.0]), r"den_b\[0\] is -1.0"),
    (lambda: bootstrap_statistic(0, lambda indices: 0.0), "num_items=0"),
    (lambda: bootstrap_statistic(3, lambda indices: math.nan), "statistic returned nan on item indices"),
    (lambda: bootstrap_mean([1.0], num_resamples=0), "num_resamples=0"),
    (lambda: bootstrap_mean([1.0], confidence=1.0), "confidence=1.0"),
])
def test_bad_input_is_refused_with_a_named_cause(call, message):
    with pytest.raises(ValueError, match=message):
        call()
