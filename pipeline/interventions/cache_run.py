"""One right-padded forward that returns the logits and the values at chosen sites.

:func:`run_with_cache` is what ``Model.run_with_cache`` runs: token sequences of any lengths
are right-padded into one batch (causal attention: real tokens never see the pads, so each
row's values equal those of a forward of that row alone), every requested site is recorded
(edits entered around it apply, and their recording sees the edited values), and the values
are cut to the requested positions of each row.

Padded positions hold NaN in what is returned (``all`` positions; the logits), so a mean or
max that runs over them shows it instead of mixing in values of pad tokens; ``lengths``
says where each row ends. Attention patterns and scores are NaN in a pad's query row; their
key columns past a row's end are the model's own (0 in a pattern: causal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.capture import padded_batch
from mlx_interp.interventions.site_hooks import KEY_AXIS_KINDS, resolve_sites
from mlx_interp.interventions.site_names import Site
from mlx_interp.interventions.sites import capture_sites, seq_first
from mlx_interp.interventions.token_positions import PositionError, Positions, row_lengths

__all__ = ["run_with_cache", "select_positions"]


def select_positions(value: mx.array, kind: str, lengths: Sequence[int], positions: Any):
    """A site's value ``[batch, seq, ...]`` (scores/pattern ``[batch, heads, query, key]``)
    at ``positions`` of each row: ``all`` -> the value with pad tokens NaN; ``last`` ->
    ``[batch, ...]`` (so does one int); a list (or equal-length per-row lists) ->
    ``[batch, n, ...]``."""
    spec = Positions(positions)
    width = value.shape[2 if kind in KEY_AXIS_KINDS else 1]
    if spec.every:
        real = mx.arange(width)[None, :] < mx.array(list(lengths))[:, None]  # [batch, seq]
        shape = [value.shape[0], 1, width, 1] if kind in KEY_AXIS_KINDS else [*real.shape]
        shape += [1] * (value.ndim - len(shape))
        return mx.where(real.reshape(shape), value, mx.array(np.nan, value.dtype))
    rows = spec.resolved(np.asarray(list(lengths)))
    if len({len(r) for r in rows}) != 1:
        raise PositionError(
            f"per-row positions of different counts {[len(r) for r in rows]} cannot share one "
            "array; give every row the same number of positions"
        )
    index = mx.array(rows, dtype=mx.int32)  # [batch, n]
    picked = seq_first(value, kind)[mx.arange(value.shape[0])[:, None], index]
    one = isinstance(positions, (int, np.integer)) or positions == "last"
    return picked[:, 0] if one else picked  # one position: no position axis


def run_with_cache(
    model: Any,
    sequences: Sequence[Sequence[int]],
    sites: Sequence[Any] | str | Site,
    positions: Any = "all",
    pad_id: int = 0,
    as_numpy: bool = False,
) -> tuple[Any, dict[Site, Any], list[int]]:
    """``(logits [batch, max_len, vocab], {site: value}, lengths)`` of one right-padded
    forward of ``sequences`` (token ids), the values at ``positions`` (see
    :func:`select_positions`). Values are ``mx.array`` (``as_numpy``: float32 numpy)."""
    tokens, lengths = padded_batch([list(map(int, s)) for s in sequences], pad_id)
    chosen = resolve_sites(model, sites)
    with row_lengths(lengths), capture_sites(model, chosen) as recorder:
        logits = model(tokens)
        values = {
            site: select_positions(recorder.outputs[site.name], site.kind, lengths, positions)
            for site in chosen
        }
    logits = select_positions(logits, "logits", lengths, "all")
    mx.eval(logits, *values.values())
    if as_numpy:
        logits = np.array(logits.astype(mx.float32))
        values = {site: np.array(v.astype(mx.float32)) for site, v in values.items()}
    return logits, values, lengths
