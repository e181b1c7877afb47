"""A steering setting's edits, from a direction set measured at one site kind.

- :func:`edits_for`: the edits at the layers of a setting: residual edits
  (:class:`~mlx_interp.interventions.steering.LayerEdit`) or edits at a site inside the
  layers (:class:`~mlx_interp.interventions.sites.SiteEdit`: attention output, per-head
  outputs, values), either the set's own (vector, centre) or, for prompts whose side a probe
  read, the edit toward the other class (:func:`mlx_interp.analysis.sides.toward_other`);
- :func:`head_effects` and :func:`keep_heads`: which heads of a layer carry the contrast (the
  size of each head's share of the class difference after the output projection) and a
  direction set restricted to some heads (the other heads' entries zeroed, so an edit leaves
  them alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.analysis.sides import toward_other
from mlx_interp.interventions.sites import Site, SiteEdit, head_shape, site_module
from mlx_interp.interventions.steering import LayerEdit


def edits_for(
    ds: DirectionSet, layers: Sequence[int], kind: str = "resid", side: str | None = None
) -> tuple[Any, ...]:
    """The edits of ``ds`` at ``layers`` for site ``kind`` (a :class:`Site` kind); ``side``
    (``pos``/``neg``): the edit toward the other class instead of the set's own."""
    out: list[LayerEdit | SiteEdit] = []
    for layer in layers:
        if side is None:
            vector, center = ds.vectors[layer], ds.center(layer)
        else:
            vector, center = toward_other(ds, layer, side)
        if kind == "resid":
            out.append(LayerEdit(int(layer), vector, center))
        else:
            out.append(SiteEdit(Site(int(layer), kind), vector, center))
    return tuple(out)


def head_effects(model: Any, layer: int, difference: np.ndarray) -> np.ndarray:
    """float ``[n_heads]``: the norm of each head's part of ``difference`` (a per-head output
    difference, flat ``[n_heads * head_dim]``) after the layer's output projection, i.e. how
    much of the class difference each head writes into the residual stream."""
    n_heads, head_dim = head_shape(model, layer)
    blocks = np.zeros((n_heads, n_heads * head_dim), np.float32)
    for h in range(n_heads):
        blocks[h, h * head_dim : (h + 1) * head_dim] = difference[h * head_dim : (h + 1) * head_dim]
    proj = site_module(model, Site(layer, "heads"))
    out = proj(mx.array(blocks))
    return np.linalg.norm(np.array(out.astype(mx.float32)), axis=-1)


def top_heads(effects: np.ndarray, k: int) -> tuple[int, ...]:
    """The ``k`` heads with the largest effect, in head order."""
    return tuple(sorted(int(h) for h in np.argsort(-np.asarray(effects), kind="stable")[:k]))


def keep_heads(ds: DirectionSet, heads: Sequence[int], n_heads: int) -> DirectionSet:
    """``ds`` with every head's entries but ``heads`` zeroed in its vectors (flat per-head
    layout ``[n_heads * head_dim]``); the class means are kept."""
    vectors = {}
    for layer, v in ds.vectors.items():
        mask = np.zeros((n_heads, v.shape[0] // n_heads), np.float32)
        mask[list(heads)] = 1.0
        vectors[layer] = v * mask.reshape(-1)
    meta = {**ds.meta, "heads": [int(h) for h in heads]}
    return DirectionSet(vectors, ds.pos_means, ds.neg_means, ds.method, ds.contrast, meta)
