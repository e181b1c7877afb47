"""Report statistics against scipy and closed forms."""

import math

import numpy as np
import pytest
from scipy import stats as st

from mlx_interp.analysis.stats import (
    SwapStats,
    binomial_test,
    bootstrap_ci,
    bootstrap_diff_ci,
    mean_sd,
    wilson_interval,
)


def wilson_by_hand(k, n, confidence=0.95):
    z = st.norm.ppf(0.5 + confidence / 2)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


@pytest.mark.parametrize("k,n", [(102, 112), (0, 10), (10, 10), (3, 7), (1, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_closed_form(k, n, confidence):
    lo, hi = wilson_interval(k, n, confidence)
    assert (lo, hi) == pytest.approx(wilson_by_hand(k, n, confidence), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_known_value_and_empty():
    assert wilson_interval(102, 112) == pytest.approx((0.84341, 0.95078), abs=1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(5, 3)


def test_binomial_test_matches_scipy():
    for k, n, p0, alt in [
        (102, 112, 0.138, "greater"),
        (5, 20, 0.3, "two-sided"),
        (1, 50, 0.1, "less"),
    ]:
        expected = st.binomtest(k, n, p0, alternative=alt).pvalue
        assert binomial_test(k, n, p0, alt) == pytest.approx(expected, rel=1e-12)
    assert binomial_test(102, 112, 0.138) < 1e-50
    assert binomial_test(15, 112, 0.138) > 0.5


def test_binomial_test_degenerate_null_and_validation():
    assert binomial_test(3, 10, 0.0) == 0.0
    assert binomial_test(3, 10, 0.0, "two-sided") == 0.0
    assert binomial_test(0, 10, 0.0) == 1.0
    assert binomial_test(9, 10, 1.0, "less") == 0.0
    for bad in [dict(p0=1.5), dict(p0=float("nan")), dict(alternative="bigger")]:
        with pytest.raises(ValueError):
            binomial_test(3, 10, **{"p0": 0.5, **bad})
    with pytest.raises(ValueError, match="n >= 1"):
        binomial_test(0, 0, 0.5)


def test_bootstrap_ci_covers_mean_with_t_width():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, size=200)
    est, lo, hi = bootstrap_ci(x, n_resamples=2000)
    assert est == pytest.approx(x.mean())
    assert lo < 5.0 < hi
    t_lo, t_hi = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert (hi - lo) == pytest.approx(t_hi - t_lo, rel=0.2)


def test_bootstrap_is_seeded_and_accepts_other_statistics():
    x = np.random.default_rng(2).exponential(size=50)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)
    est, lo, hi = bootstrap_ci(x, statistic=np.median, method="BCa")
    assert est == pytest.approx(np.median(x)) and lo < est < hi
    est, lo, hi = bootstrap_ci(x, statistic=lambda v: float(np.max(v)))  # no axis keyword
    assert lo <= est == hi


def test_bootstrap_edge_cases():
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    est, lo, hi = bootstrap_ci([4.0])
    assert est == 4.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci([1.0, 2.0], method="bca")


def test_bootstrap_diff_flags_planted_difference_only():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 100), rng.normal(0.0, 1.0, 120)
    res = bootstrap_diff_ci(a, b)
    assert res.estimate == pytest.approx(a.mean() - b.mean())
    assert res.lo < 1.0 < res.hi and res.significant
    null = bootstrap_diff_ci(rng.normal(0, 1, 100), rng.normal(0, 1, 120))
    assert null.lo < 0.0 < null.hi and not null.significant
    assert bootstrap_diff_ci(a, b, seed=5) == bootstrap_diff_ci(a, b, seed=5)
    # swap rates as 0/1 outcomes: 30/40 steered vs 3/40 random
    steered, random = np.r_[np.ones(30), np.zeros(10)], np.r_[np.ones(3), np.zeros(37)]
    est, lo, hi, sig = bootstrap_diff_ci(steered, random)
    assert est == pytest.approx(0.675) and sig and lo > 0.4


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, np.std([1, 2, 3, 4], ddof=1)))
    m, sd = mean_sd([2.0])
    assert m == 2.0 and math.isnan(sd)
    assert all(math.isnan(x) for x in mean_sd([]))


def test_swap_stats():
    s = SwapStats.from_counts(102, 112)
    assert (s.k, s.n) == (102, 112) and s.rate == pytest.approx(102 / 112)
    assert (s.ci_lo, s.ci_hi) == pytest.approx(wilson_interval(102, 112))
    assert s.p_value(0.138) < 1e-50
    empty = SwapStats.from_counts(0, 0)
    assert math.isnan(empty.rate) and math.isnan(empty.ci_lo)
    with pytest.raises(ValueError):
        SwapStats.from_counts(-1, 5)
