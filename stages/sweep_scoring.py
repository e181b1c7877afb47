"""Scoring steering settings on a table of prompts for the sweep (helper of the sweep stage).

``table`` rows hold ``tokens``, ``condition`` and ``meta`` (the prompts stage's columns).
Rows of the two swap classes are scored with their own word as the original and the other
class's as the target; other rows (controls) with placeholder words: only their top word is
used (did it become a swap word?). Every call scores several settings at once (each row under
its own: its fold's direction, its side's edit) through ``Scorer.score_settings``, so the
settings run as rows of batched forwards on the prompts' reused unsteered states where the
fast path can.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from mlx_interp.analysis.fluency import fluency
from mlx_interp.analysis.scoring import UNSTEERED, GenerateScorer, LogitScorer, Steering
from mlx_interp.interventions.positions import object_spans
from mlx_interp.stages.steer_rows import fluency_prompts, fluency_spec

# side -> the edits of that side (None: the set's own edits for every row)
EditsFor = Callable[[str | None], tuple]


def word_pair(conditions: Sequence[str], swap: dict) -> tuple[list[str], list[str]]:
    """(original, target) word per row; rows not in ``swap`` get placeholders."""
    words = sorted(set(swap) | set(swap.values()))
    original = [c if c in swap else words[0] for c in conditions]
    target = [swap.get(c, words[-1]) for c in conditions]
    return original, target


def spans_of(lm, table: pd.DataFrame) -> list[tuple[int, int]]:
    tokens = [list(map(int, t)) for t in table["tokens"]]
    return object_spans(lm.tokenizer, tokens, table["meta"].tolist(), table["prompt_id"].tolist())


def logit_pairs(lm, table, settings, pairs, spans, swap, batch_size=32):
    """(swapped [pairs], top word [pairs]) of each ``(row, setting index)`` pair."""
    if not pairs:
        return np.zeros(0, bool), np.empty(0, object)
    original, target = word_pair(table["condition"].tolist(), swap)
    tokens = [list(map(int, t)) for t in table["tokens"]]
    words = sorted(set(swap) | set(swap.values()))
    res = pd.DataFrame(
        LogitScorer(batch_size).score_settings(
            lm, tokens, original, target, words, settings, pairs, lm.pad_id, spans
        )
    )
    return res["margin"].to_numpy() > 0, res["top_word"].to_numpy()


def unsteered_rows(lm, table, swap):
    """(swapped [n], top word [n]) of every row of ``table``, unsteered."""
    return logit_pairs(lm, table, [UNSTEERED], [(i, 0) for i in range(len(table))], None, swap)


def sided_settings(groups, make, sides):
    """Settings and pairs steering each row by its group's edits and its side: ``groups`` is
    a list of (rows, edits_for) (e.g. one per fold); ``sides`` None (no gate) or a side per
    row (pos / neg / other: other rows get no pair)."""
    settings, pairs = [], []
    for rows, edits_for in groups:
        rows = np.asarray(rows, int)
        by_side: dict[str | None, np.ndarray] = {None: rows} if sides is None else {}
        if sides is not None:
            for name in ("pos", "neg"):
                by_side[name] = rows[np.asarray(sides)[rows] == name]
        for side, mine in by_side.items():
            if len(mine):
                settings.append(make(edits_for(side)))
                pairs += [(int(r), len(settings) - 1) for r in mine]
    return settings, pairs


def sided_scores(lm, table, groups, make, sides, spans, swap, base):
    """(swapped [n], top [n]) of the table's rows under :func:`sided_settings`; rows without
    a pair (read as neither class, or in no group) keep their unsteered result ``base``."""
    swapped, top = base[0].copy(), base[1].copy()
    settings, pairs = sided_settings(groups, make, sides)
    got = logit_pairs(lm, table, settings, pairs, spans, swap)
    for (row, _), s, t in zip(pairs, *got, strict=True):
        swapped[row], top[row] = s, t
    return swapped, top


def loop_rate(lm, table, n, score, edits_for: EditsFor | None, sides, make) -> float:
    """Share of ``n`` open-ended answers (questions of ``table``, evenly spaced; the steer
    stage's prompts and loop test) that end in a loop, each steered by its side's edits
    (``edits_for`` None: unsteered)."""
    score = replace(score, fluency=replace(score.fluency, n_prompts=n))
    table = table.assign(_side=list(sides) if sides is not None else None)
    sample = fluency_prompts(table, score, lm.tokenizer, lm.prompt_format)
    if sample.empty:
        return float("nan")
    spec = fluency_spec(score)
    every = np.arange(len(sample))
    if edits_for is None:
        settings, pairs = [UNSTEERED], [(int(i), 0) for i in every]
    else:
        side = None if sides is None else sample["_side"].to_numpy()
        settings, pairs = sided_settings([(every, edits_for)], make, side)
        if side is not None:  # rows read as neither class answer unsteered
            settings.append(UNSTEERED)
            pairs += [(int(i), len(settings) - 1) for i in every[side == "other"]]
    tokens = [list(map(int, t)) for t in sample["tokens"]]
    spans = None
    if any(s.edits and s.positions == "object" for s in settings):
        spans = object_spans(
            lm.tokenizer, tokens, sample["meta"].tolist(), sample["prompt_id"].tolist()
        )
    gen = GenerateScorer(score.fluency.max_tokens)
    words = ["a", "b"]  # the answers' words are not scored here, only their loops
    rows = gen.score_settings(
        lm,
        tokens,
        words[:1] * len(tokens),
        words[1:] * len(tokens),
        words,
        settings,
        pairs,
        lm.pad_id,
        spans,
    )
    return float(np.mean([fluency(r["token_ids"], spec).loop for r in rows]))


def steering_maker(mode, alpha: float, positions: str) -> Callable[[tuple], Steering]:
    return lambda edits: Steering(tuple(edits), mode, float(alpha), positions)
