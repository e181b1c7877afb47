"""Scoring a steering setting on a table of prompts, once per side when a probe decides each
prompt's side (helper of the sweep stage).

``table`` rows hold ``tokens``, ``condition`` and ``meta`` (the prompts stage's columns).
Rows of the two swap classes are scored with their own word as the original and the other
class's as the target; other rows (controls) with placeholder words: only their top word is
used (did it become a swap word?).
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
    return object_spans(lm.tokenizer, tokens, table["meta"].tolist())


def logit_rows(lm, table, rows, steering, spans, swap, batch_size=32):
    """(swapped [rows], top word [rows]) of ``table``'s ``rows`` under ``steering``."""
    if len(rows) == 0:
        return np.zeros(0, bool), np.empty(0, object)
    cond = table["condition"].to_numpy()[rows]
    original, target = word_pair(cond, swap)
    tokens = [list(map(int, table["tokens"].iloc[i])) for i in rows]
    words = sorted(set(swap) | set(swap.values()))
    res = pd.DataFrame(
        LogitScorer(batch_size)(
            lm,
            tokens,
            original,
            target,
            words,
            steering,
            lm.pad_id,
            spans=None if spans is None else [spans[i] for i in rows],
        )
    )
    return res["margin"].to_numpy() > 0, res["top_word"].to_numpy()


def sided_rows(lm, table, rows, edits_for: EditsFor, sides, make, spans, swap, base):
    """(swapped, top) of ``rows`` when each row is steered by the edits of its side
    (``sides[row]``: pos / neg / other; None: no gate, every row the set's own edits).
    ``make(edits) -> Steering``; rows read as ``other`` keep their unsteered result ``base``
    (swapped [n], top [n] of the whole table)."""
    rows = np.asarray(rows, int)
    swapped = np.zeros(len(rows), bool)
    top = np.empty(len(rows), object)
    groups = {None: np.ones(len(rows), bool)} if sides is None else {}
    if sides is not None:
        for side in ("pos", "neg", "other"):
            groups[side] = np.asarray(sides)[rows] == side
    for side, mask in groups.items():
        if not mask.any():
            continue
        if side == "other":
            swapped[mask], top[mask] = base[0][rows[mask]], base[1][rows[mask]]
            continue
        got = logit_rows(lm, table, rows[mask], make(edits_for(side)), spans, swap)
        swapped[mask], top[mask] = got
    return swapped, top


def loop_rate(lm, table, n, score, edits_for: EditsFor | None, sides, make) -> float:
    """Share of ``n`` open-ended answers (questions of ``table``, evenly spaced; the steer
    stage's prompts and loop test) that end in a loop, each steered by its side's edits
    (``edits_for`` None: unsteered)."""
    score = replace(score, fluency=replace(score.fluency, n_prompts=n))
    table = table.assign(_side=list(sides) if sides is not None else None)
    sample = fluency_prompts(table, score, lm.tokenizer, lm.prompt_format)
    spec = fluency_spec(score)
    gen = GenerateScorer(score.fluency.max_tokens)
    loops = []
    groups = [None] if sides is None or edits_for is None else ["pos", "neg", "other"]
    for side in groups:
        part = sample if side is None else sample[sample["_side"] == side]
        if part.empty:
            continue
        tokens = [list(map(int, t)) for t in part["tokens"]]
        steering = UNSTEERED
        if edits_for is not None and side != "other":
            steering = make(edits_for(side))
        spans = None
        if steering.edits and steering.positions == "object":
            spans = object_spans(lm.tokenizer, tokens, part["meta"].tolist())
        words = ["a", "b"]  # the answers' words are not scored here, only their loops
        rows = gen(
            lm,
            tokens,
            ["a"] * len(tokens),
            ["b"] * len(tokens),
            words,
            steering,
            lm.pad_id,
            spans=spans,
        )
        loops += [fluency(r["token_ids"], spec).loop for r in rows]
    return float(np.mean(loops)) if loops else float("nan")


def steering_maker(mode, alpha: float, positions: str) -> Callable[[tuple], Steering]:
    return lambda edits: Steering(tuple(edits), mode, float(alpha), positions)
