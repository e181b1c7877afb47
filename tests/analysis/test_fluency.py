"""Fluency metrics on hand-made sequences with known answers."""

from __future__ import annotations

import math

import pytest

from mlx_interp.analysis.fluency import (
    FluencyError,
    FluencySpec,
    distinct_n,
    fluency,
    longest_repeat,
    loop_period,
    repeated_ngram_share,
)


def test_distinct_and_repeated_share_by_hand():
    seq = list("abcabcx")  # 3-grams: abc bca cab abc bcx -> 5, of which 4 distinct
    assert distinct_n(seq, 3) == pytest.approx(4 / 5)
    assert repeated_ngram_share(seq, 3) == pytest.approx(1 / 5)
    assert distinct_n(seq, 1) == pytest.approx(4 / 7)  # a b c x
    assert distinct_n(seq, 2) == pytest.approx(4 / 6)  # ab bc ca ab bc cx
    assert repeated_ngram_share(list("abcdef"), 3) == 0.0
    assert repeated_ngram_share(["x"] * 6, 3) == pytest.approx(3 / 4)
    assert math.isnan(distinct_n(list("ab"), 3)) and math.isnan(repeated_ngram_share([], 3))


def test_works_on_words_and_token_ids_alike():
    words = "the cat sat the cat sat".split()
    ids = [5, 9, 2, 5, 9, 2]
    assert fluency(words) == fluency(ids)


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        ("abcdef", 0),
        ("aa", 2),
        ("xaaay", 3),
        ("ababa", 5),  # period 2, two full copies plus one
        ("abab", 4),
        ("aba", 0),  # one copy and a bit: not a repeat
        ("xyzabcabcq", 6),
        ("abcabcab" + "zz", 8),  # the period-3 run beats the period-1 "zz"
    ],
)
def test_longest_repeat(seq, expected):
    assert longest_repeat(list(seq)) == expected


@pytest.mark.parametrize(
    ("seq", "max_period", "min_repeats", "expected"),
    [
        ("hello world", 10, 3, 0),
        ("xyzaaa", 10, 3, 1),
        ("xyzaa", 10, 3, 0),  # two copies are not enough with min_repeats=3
        ("xyzaa", 10, 2, 1),
        ("qababab", 10, 3, 2),
        ("qababa", 10, 3, 0),  # 2.5 copies of "ab"
        ("ababab" + "c", 10, 3, 0),  # the loop did not last to the end
        ("q" + "abcd" * 3, 10, 3, 4),
        ("q" + "abcd" * 3, 3, 3, 0),  # period 4 is longer than max_period
        ("aaaa", 10, 3, 1),  # smallest period wins (2 would also fit twice)
        ("", 10, 3, 0),
    ],
)
def test_loop_period(seq, max_period, min_repeats, expected):
    assert loop_period(list(seq), max_period, min_repeats) == expected


def test_fluency_bundle_flags_a_token_loop():
    # " high" "-" "tech" "," repeated at the end: a period-4 loop
    tail = [11, 12, 13, 14] * 4
    metrics = fluency([1, 2, 3, 4, 5, 6] + tail)
    assert metrics.loop and metrics.loop_period == 4
    assert metrics.n_tokens == 22
    assert metrics.longest_repeat == 16
    assert metrics.repeated_ngram_share == pytest.approx(10 / 20)  # 20 3-grams, 10 distinct
    fine = fluency([1, 2, 3, 4, 5, 6, 7, 8])
    assert not fine.loop and fine.loop_period == 0 and fine.distinct_2 == 1.0
    assert set(fine.as_dict()) == {
        "n_tokens",
        "repeated_ngram_share",
        "longest_repeat",
        "distinct_1",
        "distinct_2",
        "loop",
        "loop_period",
    }


def test_spec_changes_the_verdict_and_rejects_nonsense():
    seq = [1, 2, 3, 7, 8, 7, 8]
    assert not fluency(seq).loop
    assert fluency(seq, FluencySpec(min_repeats=2)).loop
    assert fluency(seq, FluencySpec(ngram=2)).repeated_ngram_share == pytest.approx(1 / 6)
    for bad in ({"ngram": 0}, {"max_period": 0}, {"min_repeats": 1}):
        with pytest.raises(FluencyError, match="at least"):
            FluencySpec(**bad)
    with pytest.raises(FluencyError, match="n-gram size"):
        distinct_n([1, 2], 0)
