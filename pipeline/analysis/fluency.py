"""Fluency of a generation: repetition, distinct-n and whether it fell into a loop.

Every metric works on a sequence of hashable items: token ids (what the steer stage uses, so
a loop is seen exactly as the model produced it) or words (``text.split()``).

Definitions, for a sequence ``t`` of ``L`` items:

- n-grams: the ``L - n + 1`` windows ``t[i:i+n]``.
- ``distinct_n``: distinct n-grams / n-grams (Li et al. 2016); NaN when ``L < n``.
- ``repeated_ngram_share``: share of n-grams that repeat an earlier one, ``1 - distinct_n``
  (0 = no n-gram seen twice); NaN when ``L < n``.
- ``longest_repeat``: the longest span, in items, that is periodic with some period
  ``p >= 1`` (``t[i] == t[i - p]`` throughout, after its first ``p`` items) and holds at
  least two full copies of its cycle (``span >= 2p``); 0 when there is none. ``a b a b a``
  has span 5 (period 2); ``the the`` has span 2 (period 1).
- loop: the generation ends inside a cycle: its last ``span`` items are periodic with a
  period ``p <= max_period`` and hold at least ``min_repeats`` full copies
  (``span >= min_repeats * p``). ``... high-tech, high-tech, high-tech,`` is a loop of
  period 4 tokens (`` high``, ``-``, ``tech``, ``,``). The loop rate of a set of
  generations is the share flagged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "FluencyError",
    "FluencyMetrics",
    "FluencySpec",
    "distinct_n",
    "fluency",
    "longest_repeat",
    "loop_period",
    "repeated_ngram_share",
]


class FluencyError(ValueError):
    """A fluency setting that makes no sense (n < 1, period < 1, repeats < 2)."""


def _ngrams(items: Sequence[Hashable], n: int) -> list[tuple]:
    if n < 1:
        raise FluencyError(f"n-gram size must be at least 1, got {n}")
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def distinct_n(items: Sequence[Hashable], n: int) -> float:
    """Distinct n-grams / n-grams; NaN when the sequence is shorter than ``n``."""
    grams = _ngrams(items, n)
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_share(items: Sequence[Hashable], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram (``1 - distinct_n``); NaN if ``L < n``."""
    return 1.0 - distinct_n(items, n)


def longest_repeat(items: Sequence[Hashable]) -> int:
    """Longest periodic span holding at least two copies of its cycle (0 if none)."""
    best = 0
    for p in range(1, len(items) // 2 + 1):
        run = 0  # consecutive i with items[i] == items[i - p]
        for i in range(p, len(items)):
            run = run + 1 if items[i] == items[i - p] else 0
            if run >= p:
                best = max(best, run + p)
    return best


def _tail_matches(items: Sequence[Hashable], p: int) -> int:
    """How many of the last items equal the item ``p`` before them, counted from the end."""
    k, i = 0, len(items) - 1
    while i - p >= 0 and items[i] == items[i - p]:
        k, i = k + 1, i - 1
    return k


def loop_period(items: Sequence[Hashable], max_period: int = 10, min_repeats: int = 3) -> int:
    """Smallest period ``p <= max_period`` whose cycle ends the sequence with at least
    ``min_repeats`` full copies (``span >= min_repeats * p``); 0 when it does not loop."""
    if max_period < 1:
        raise FluencyError(f"max_period must be at least 1, got {max_period}")
    for p in range(1, max_period + 1):
        if p + _tail_matches(items, p) >= min_repeats * p:
            return p
    return 0


@dataclass(frozen=True)
class FluencySpec:
    """Parameters of the metrics: n-gram size and what counts as a loop (see module doc)."""

    ngram: int = 3  # n of the repeated-n-gram share
    max_period: int = 10  # longest cycle (in items) a loop may have
    min_repeats: int = 3  # full copies of the cycle at the end that make a loop

    def __post_init__(self):
        if self.ngram < 1:
            raise FluencyError(f"fluency ngram must be at least 1, got {self.ngram}")
        if self.max_period < 1:
            raise FluencyError(f"fluency max_period must be at least 1, got {self.max_period}")
        if self.min_repeats < 2:
            raise FluencyError(
                f"fluency min_repeats must be at least 2 (one copy is no repetition), "
                f"got {self.min_repeats}"
            )


@dataclass(frozen=True)
class FluencyMetrics:
    """The fluency of one generation (see the module doc for each definition)."""

    n_tokens: int
    repeated_ngram_share: float
    longest_repeat: int
    distinct_1: float
    distinct_2: float
    loop: bool
    loop_period: int  # period of the final cycle when ``loop``, else 0

    def as_dict(self) -> dict:
        return asdict(self)


def fluency(items: Sequence[Hashable], spec: FluencySpec | None = None) -> FluencyMetrics:
    """All fluency metrics of one generation (token ids or words)."""
    spec = spec or FluencySpec()
    items = list(items)
    period = loop_period(items, spec.max_period, spec.min_repeats)
    return FluencyMetrics(
        n_tokens=len(items),
        repeated_ngram_share=repeated_ngram_share(items, spec.ngram),
        longest_repeat=longest_repeat(items),
        distinct_1=distinct_n(items, 1),
        distinct_2=distinct_n(items, 2),
        loop=period > 0,
        loop_period=period,
    )
