"""Helpers the steering stages share (steer, baseline, sweep): the open-ended prompts of the
fluency check and the parameters of its loop test."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlx_interp.analysis.fluency import FluencyError, FluencySpec, fluency
from mlx_interp.analysis.scoring import ScoringError
from mlx_interp.engine.schema import ScoreConfig
from mlx_interp.io.prompts import render


def fluency_spec(score: ScoreConfig) -> FluencySpec:
    """The fluency metrics' parameters from ``score.fluency``."""
    f = score.fluency
    try:
        return FluencySpec(f.ngram, f.max_period, f.min_repeats)
    except FluencyError as err:
        raise ScoringError(f"score.fluency: {err}") from err


def fluency_prompts(
    swap: pd.DataFrame, score: ScoreConfig, tokenizer, fmt: str = "chat"
) -> pd.DataFrame:
    """``score.fluency.n_prompts`` swap questions, evenly spaced over the table (so every swap
    class is covered, without a seed), as open-ended zero-shot prompts (``tokens``) in the
    model's prompt format (chat; plain text for a base model); only test questions when the
    table has a test split (the loop rate is a held-out number)."""
    f = score.fluency
    n = f.n_prompts
    if n < 0:
        raise ScoringError(f"score.fluency.n_prompts must be >= 0 (0 = off), not {n}")
    if "{text}" not in f.instruction:
        raise ScoringError(
            f"score.fluency.instruction {f.instruction!r} has no {{text}}: it must place the "
            "question, e.g. '{text} Describe it in two or three sentences.'"
        )
    if "variant" in swap:  # the dataset's original wording only
        swap = swap[swap["variant"] == ""].reset_index(drop=True)
    if "split" in swap and (swap["split"] == "test").any():  # held out: loops on test rows
        swap = swap[swap["split"] == "test"].reset_index(drop=True)
    n = min(n, len(swap))
    picks: np.ndarray | list[int] = (
        np.unique(np.linspace(0, len(swap) - 1, n).round().astype(int)) if n else []
    )
    sample = swap.iloc[picks].reset_index(drop=True)
    texts = [f.instruction.format(text=t) for t in sample["text"]]
    sample["tokens"] = [render(tokenizer, t, fmt, None, [])[1] for t in texts]
    return sample


def add_fluency(table: pd.DataFrame, spec: FluencySpec) -> pd.DataFrame:
    """The fluency metrics of every row that holds generated ``token_ids`` (others: NaN)."""
    if "token_ids" not in table:
        return table
    metrics = [
        fluency(list(ids), spec).as_dict() if isinstance(ids, (list, np.ndarray)) else {}
        for ids in table["token_ids"]
    ]
    extra = pd.DataFrame(metrics, index=table.index)
    if "loop" in extra:
        extra["loop"] = extra["loop"].astype("boolean")
    return pd.concat([table, extra], axis=1)
