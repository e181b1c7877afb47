"""Where a direction is measured (``directions.site``): the rows a contrast is fitted on.

- ``last``: the last prompt token (from the capture artifact, or read from the model);
- ``object``: the mean over the object's own tokens (the dataset row's ``object``);
- ``answer``: the answer contrast: every prompt of both conditions followed by each answer
  word (the condition names, capitalized like the few-shot answers), read at that word;
  pos rows are those followed by the pos word, whatever the question.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pandas as pd

from mlx_interp.analysis.directions import DirectionError, DirectionSet
from mlx_interp.analysis.lens import answer_direction, unembed
from mlx_interp.analysis.scoring import word_token_ids
from mlx_interp.analysis.sides import AxisSide, SideProbe
from mlx_interp.engine.schema import DIRECTION_SITES
from mlx_interp.interventions.positions import object_spans
from mlx_interp.interventions.readout import answer_sequences, residuals_at, site_values_at
from mlx_interp.interventions.sites import Site

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
    lm, prompts: pd.DataFrame, site: str, pos: str, neg: str, layers=None, kind: str = "resid"
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """(layer -> [rows, width], is_pos [rows], is_neg [rows]) for ``prompts`` (pos and neg
    conditions only) measured at token role ``site``, read from the model: the residual after
    each layer (``kind`` resid), or a site inside the layers (``kind`` attn, heads, ...: the
    kinds of :class:`mlx_interp.interventions.sites.Site`; ``layers`` needed)."""
    check_site(site)
    tokens = [list(map(int, t)) for t in prompts["tokens"]]
    cond = prompts["condition"].to_numpy()
    if site == "answer":
        seqs, spans, said = answer_sequences(lm.tokenizer, tokens, [pos, neg])
        words = np.asarray(said)
        return read_at(lm, seqs, spans, layers, kind), words == pos, words == neg
    return (
        read_at(lm, tokens, role_spans(lm, prompts, site), layers, kind),
        cond == pos,
        cond == neg,
    )


def role_spans(lm, prompts: pd.DataFrame, role: str) -> list[tuple[int, int]]:
    """``[start, end)`` per prompt: the object's tokens, or the last token."""
    tokens = [list(map(int, t)) for t in prompts["tokens"]]
    if role == "object":
        return object_spans(
            lm.tokenizer, tokens, prompts["meta"].tolist(), prompts["prompt_id"].tolist()
        )
    return [(len(t) - 1, len(t)) for t in tokens]


def read_at(lm, seqs, spans, layers, kind: str = "resid") -> dict[int, np.ndarray]:
    """layer -> [rows, width]: the value at ``kind`` averaged over each span."""
    if kind == "resid":
        return residuals_at(lm.model, seqs, spans, layers, lm.pad_id)
    if not layers:
        raise DirectionError(f"reading the {kind} site needs the layers listed")
    names = {Site(int(layer), kind).name: int(layer) for layer in layers}
    got = site_values_at(lm.model, seqs, spans, list(names), lm.pad_id)
    return {names[name]: value for name, value in got.items()}


def side_reader(lm, method: str, C: float, contrast):
    """An unfitted side reader of a gate: a logistic probe (``probe``), the answer words' axis
    (``unembed``: the unembedding of the pos word minus the neg word through the final norm),
    or that axis and, for ``other``, how close the two words come to the top of the logit
    lens (``lens``: :func:`lens_plausibility`)."""
    if method in ("unembed", "lens"):
        pos_ids, neg_ids = (word_token_ids(lm.tokenizer, w) for w in contrast)
        axis = answer_direction(lm.model, pos_ids, neg_ids)
        plausible = lens_plausibility(lm, [*pos_ids, *neg_ids]) if method == "lens" else None
        return AxisSide(axis, plausible=plausible)
    return SideProbe(C=float(C))


def lens_plausibility(lm, ids):
    """``x [n, d_model] -> [n]``: the largest logit of ``ids`` minus the largest logit of all
    (0: one of them is the lens's top token), through the final norm and head."""
    index = mx.array(sorted(set(ids)), dtype=mx.int32)

    def score(x):
        logits = unembed(lm.model, mx.array(np.asarray(x, np.float32))).astype(mx.float32)
        return np.array(logits[:, index].max(axis=-1) - logits.max(axis=-1))

    return score


def answer_axis_set(lm, ds: DirectionSet) -> DirectionSet:
    """``ds`` with each layer's vector replaced by the answer words' axis (the unembedding of
    the pos word minus the neg word through the final norm: the same axis at every layer),
    scaled to the vector's norm; the class means (and so the centre) are kept."""
    pos_ids, neg_ids = (word_token_ids(lm.tokenizer, w) for w in ds.contrast)
    axis = answer_direction(lm.model, pos_ids, neg_ids)
    axis = axis / np.linalg.norm(axis)
    vectors = {layer: axis * np.linalg.norm(v) for layer, v in ds.vectors.items()}
    return DirectionSet(vectors, ds.pos_means, ds.neg_means, "unembed", ds.contrast, ds.meta)
