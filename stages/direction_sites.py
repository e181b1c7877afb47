"""Where a direction is measured (``directions.site``): the rows a contrast is fitted on.

- ``last``: the last prompt token (from the capture artifact, or read from the model);
- ``object``: the mean over the object's own tokens (the dataset row's ``object``);
- ``answer``: the answer contrast: every prompt of both conditions followed by each answer
  word (the condition names, capitalized like the few-shot answers), read at that word;
  pos rows are those followed by the pos word, whatever the question.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlx_interp.analysis.directions import DirectionError
from mlx_interp.engine.schema import DIRECTION_SITES
from mlx_interp.interventions.positions import object_spans
from mlx_interp.interventions.readout import answer_sequences, residuals_at

SITES = DIRECTION_SITES  # last | object | answer (one list, in the schema)
SITE_NOTES = {
    "last": "residual after each layer at the last prompt token",
    "object": "residual after each layer, mean over the object's tokens",
    "answer": "residual after each layer at the answer word appended to the prompt "
    "(pos: prompts followed by the pos word, neg: by the neg word)",
}


def check_site(site: str) -> str:
    if site not in SITES:
        raise DirectionError(f"directions.site must be one of {SITES}, not {site!r}")
    return site


def site_activations(
    lm, prompts: pd.DataFrame, site: str, pos: str, neg: str, layers=None
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """(layer -> [rows, d_model], is_pos [rows], is_neg [rows]) for ``prompts`` (pos and neg
    conditions only) measured at ``site``, read from the model."""
    check_site(site)
    tokens = [list(map(int, t)) for t in prompts["tokens"]]
    cond = prompts["condition"].to_numpy()
    if site == "answer":
        seqs, spans, words = answer_sequences(lm.tokenizer, tokens, [pos, neg])
        word = np.asarray(words)
        acts = residuals_at(lm.model, seqs, spans, layers, lm.pad_id)
        return acts, word == pos, word == neg
    if site == "object":
        spans = object_spans(
            lm.tokenizer, tokens, prompts["meta"].tolist(), prompts["prompt_id"].tolist()
        )
    else:
        spans = [(len(t) - 1, len(t)) for t in tokens]
    acts = residuals_at(lm.model, tokens, spans, layers, lm.pad_id)
    return acts, cond == pos, cond == neg
