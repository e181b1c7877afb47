"""Statistics for the report: binomial rates with Wilson intervals, exact tests, bootstrap CIs.

All functions take plain numbers or 1-D arrays and return floats (or small named tuples), so
report.json stays JSON. Confidence levels are two-sided, e.g. 0.95.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats as _st

from mlx_interp.errors import UntrustedResultError

ALTERNATIVES = ("greater", "less", "two-sided")
BOOTSTRAP_METHODS = ("percentile", "basic", "BCa")


class Interval(NamedTuple):
    """A point estimate and its confidence interval."""

    estimate: float
    lo: float
    hi: float


class DiffInterval(NamedTuple):
    """Difference of two statistics, its interval, and whether 0 lies outside it."""

    estimate: float
    lo: float
    hi: float
    significant: bool


def _check_counts(k: int, n: int) -> tuple[int, int]:
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k}, n={n}")
    return int(k), int(n)


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    return float(confidence)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) for k successes in n; n=0 -> (nan, nan)."""
    k, n = _check_counts(k, n)
    confidence = _check_confidence(confidence)
    if n == 0:
        return (math.nan, math.nan)
    ci = _st.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def binomial_test(k: int, n: int, p0: float, alternative: str = "greater") -> float:
    """Exact binomial p-value of k successes in n trials against success rate ``p0``.

    Degenerate nulls are exact, not clipped: with p0 == 0 any success is impossible under the
    null, so k > 0 gives p = 0.0 for "greater" and "two-sided" (likewise p0 == 1 and k < n
    for "less" and "two-sided"). A random-direction baseline with 0 swaps hits this case.
    """
    k, n = _check_counts(k, n)
    if n == 0:
        raise UntrustedResultError(
            "a binomial test over 0 trials has no p-value: no question was counted (check the "
            "conditions, the split and score.swap)"
        )
    if not 0.0 <= p0 <= 1.0 or math.isnan(p0):
        raise ValueError(f"p0 must be a probability in [0, 1], got {p0}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if p0 == 0.0 and k > 0 and alternative != "less":
        return 0.0
    if p0 == 1.0 and k < n and alternative != "greater":
        return 0.0
    return float(_st.binomtest(k, n, p0, alternative=alternative).pvalue)


def finite_rows(arr: np.ndarray, subject: str, error: type[Exception] = ValueError) -> np.ndarray:
    """``arr`` [n, d] as float64; raises ``error`` naming ``subject`` and the rows with NaN/inf."""
    arr = np.asarray(arr).astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise error(
            f"{subject} has NaN/inf in {bad} row(s): recapture in float32 "
            "(float16 overflows on large activations) or drop those prompts"
        )
    return arr


def require_finite(values, subject: str, fix: str) -> np.ndarray:
    """``values`` as an array; raises UntrustedResultError naming ``subject``, how many values
    are NaN/inf and ``fix`` when any is (a number computed from them could not be trusted)."""
    arr = np.asarray(values)
    finite = np.isfinite(arr)
    if not finite.all():
        raise UntrustedResultError(
            f"{subject}: {int((~finite).sum())} of {arr.size} values are NaN/inf; {fix}"
        )
    return arr


def _clean(values, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise UntrustedResultError(
            f"{name} is empty: a statistic over 0 samples cannot be reported"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN/inf: drop or impute them first")
    return arr


def _takes_axis(statistic: Callable) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _bootstrap(data, statistic, n_resamples, confidence, seed, method) -> tuple[float, float]:
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"method must be one of {BOOTSTRAP_METHODS}, got {method!r}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    res = _st.bootstrap(
        data,
        statistic,
        n_resamples=int(n_resamples),
        confidence_level=_check_confidence(confidence),
        method=method,
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_ci(
    values,
    statistic: Callable = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """(estimate, lo, hi) of ``statistic`` over ``values`` [n]; lo = hi = nan when n < 2.

    A ``statistic`` with an ``axis`` keyword (np.mean, np.median) is vectorized over the
    resamples. Deterministic given ``seed``.
    """
    arr = _clean(values)
    estimate = float(statistic(arr))
    if arr.size < 2:
        return Interval(estimate, math.nan, math.nan)
    if np.ptp(arr) == 0:  # every resample is identical: the interval is the point
        return Interval(estimate, estimate, estimate)
    lo, hi = _bootstrap((arr,), statistic, n_resamples, confidence, seed, method)
    return Interval(estimate, lo, hi)


def bootstrap_diff_ci(
    a,
    b,
    statistic: Callable = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> DiffInterval:
    """statistic(a) - statistic(b) for two independent samples [n_a], [n_b], with its CI.

    Each sample is resampled on its own (unpaired). ``significant`` is True when 0 lies
    outside the interval.
    """
    a, b = _clean(a, "a"), _clean(b, "b")
    estimate = float(statistic(a) - statistic(b))
    if a.size < 2 or b.size < 2:
        return DiffInterval(estimate, math.nan, math.nan, False)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return DiffInterval(estimate, estimate, estimate, estimate != 0)

    def diff_along(x, y, axis=-1):  # vectorized: scipy passes the resamples' axis
        return statistic(x, axis=axis) - statistic(y, axis=axis)

    def diff_once(x, y):
        return statistic(x) - statistic(y)

    diff = diff_along if _takes_axis(statistic) else diff_once
    lo, hi = _bootstrap((a, b), diff, n_resamples, confidence, seed, method)
    return DiffInterval(estimate, lo, hi, bool(lo > 0 or hi < 0))


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); sd is nan when n < 2, both when n == 0."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        return (math.nan, math.nan)
    sd = float(arr.std(ddof=1)) if arr.size >= 2 else math.nan
    return (float(arr.mean()), sd)


@dataclass(frozen=True)
class SwapStats:
    """k swaps out of n generations: rate with its Wilson interval."""

    k: int
    n: int
    rate: float
    ci_lo: float
    ci_hi: float

    @classmethod
    def from_counts(cls, k: int, n: int, confidence: float = 0.95) -> SwapStats:
        k, n = _check_counts(k, n)
        lo, hi = wilson_interval(k, n, confidence)
        return cls(k, n, k / n if n else math.nan, lo, hi)

    def p_value(self, p0: float, alternative: str = "greater") -> float:
        """Exact binomial p-value of this rate against a baseline rate ``p0``."""
        return binomial_test(self.k, self.n, p0, alternative)
