"""Readouts at chosen token spans: what a direction is measured on.

:func:`residuals_at` returns each decoder layer's output averaged over one span per prompt
(the object's tokens, the last token, an appended answer word), running only the suffix after
the prompts' shared prefix on copies of its KV cache (exact: causal attention).
:func:`site_values_at` does the same at named sites inside the layers (attention output,
per-head outputs, ...).
:func:`answer_sequences` builds the answer contrast: each prompt followed by each answer word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.capture import (
    capture_layers,
    decoder_layers,
    padded_batch,
    resolve_layers,
)
from mlx_interp.interventions.prefix import expand_cache, shared_prefix
from mlx_interp.interventions.sites import capture_sites


def residuals_at(
    model: Any,
    seqs: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int] | None = None,
    pad_id: int = 0,
    batch_size: int = 16,
) -> dict[int, np.ndarray]:
    """layer -> float32 ``[n, d_model]``: the layer output averaged over ``spans[i]``
    (``[start, end)`` token indices of ``seqs[i]``)."""
    seqs = [[int(t) for t in s] for s in seqs]
    if len(spans) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(spans)} spans: one span per sequence")
    for i, (start, end) in enumerate(spans):
        if not 0 <= start < end <= len(seqs[i]):
            n = len(seqs[i])
            raise ValueError(f"span {start, end} of sequence {i} is outside its {n} tokens")
    p, cache0 = shared_prefix(model, seqs)
    if cache0 is not None and min(s for s, _ in spans) < p:
        p, cache0 = 0, None  # a span inside the shared prefix: run every token
    n_layers = len(decoder_layers(model))
    wanted = resolve_layers(layers, n_layers)
    out: dict[int, list[Any]] = {layer: [None] * len(seqs) for layer in wanted}  # -> arrays
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = [int(i) for i in order[begin : begin + batch_size]]
        tokens, _ = padded_batch([seqs[i][p:] for i in rows], pad_id)
        cache = expand_cache(cache0, len(rows)) if cache0 is not None else None
        width = tokens.shape[1]
        weights = np.zeros((len(rows), width), np.float32)  # [batch, seq]: span averaging
        for r, i in enumerate(rows):
            start, end = spans[i]
            weights[r, start - p : end - p] = 1.0 / (end - start)
        w = mx.array(weights)[..., None]
        with capture_layers(model, wanted, stop_after_last=True) as rec:
            rec.run(model, tokens, **({} if cache is None else {"cache": cache}))
        reduced = {k: (rec.outputs[k].astype(mx.float32) * w).sum(axis=1) for k in wanted}
        mx.eval(*reduced.values())
        rec.outputs.clear()
        for layer, value in reduced.items():
            array = np.array(value)
            for r, i in enumerate(rows):
                out[layer][i] = array[r]
    return {layer: np.stack(rows) for layer, rows in out.items()}


def site_values_at(
    model: Any,
    seqs: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    sites: Sequence[Any],
    pad_id: int = 0,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """site name -> float32 ``[n, width]``: the value at each site (``layers.23.attn``,
    ``layers.23.attn.heads`` flattened to ``n_heads * head_dim``, ...) averaged over
    ``spans[i]``, as :func:`residuals_at` does for the residual stream."""
    seqs = [[int(t) for t in s] for s in seqs]
    if len(spans) != len(seqs):
        raise ValueError(f"{len(seqs)} sequences but {len(spans)} spans: one span per sequence")
    p, cache0 = shared_prefix(model, seqs)
    if cache0 is not None and min(s for s, _ in spans) < p:
        p, cache0 = 0, None
    out: dict[str, list] = {}
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = [int(i) for i in order[begin : begin + batch_size]]
        tokens, _ = padded_batch([seqs[i][p:] for i in rows], pad_id)
        cache = expand_cache(cache0, len(rows)) if cache0 is not None else None
        weights = np.zeros((len(rows), tokens.shape[1]), np.float32)
        for r, i in enumerate(rows):
            start, end = spans[i]
            weights[r, start - p : end - p] = 1.0 / (end - start)
        w = mx.array(weights)[..., None]
        with capture_sites(model, sites, stop_after_last=True) as rec:
            rec.run(model, tokens, **({} if cache is None else {"cache": cache}))
        reduced = {}
        for name, value in rec.outputs.items():
            flat = value.reshape(*value.shape[:2], -1).astype(mx.float32)  # heads: [b, s, h*d]
            reduced[name] = (flat * w).sum(axis=1)
        mx.eval(*reduced.values())
        for name, value in reduced.items():
            array = np.array(value)
            slots = out.setdefault(name, [None] * len(seqs))
            for r, i in enumerate(rows):
                slots[i] = array[r]
    return {name: np.stack(rows) for name, rows in out.items()}


def answer_sequences(
    tokenizer: Any, seqs: Sequence[Sequence[int]], words: Sequence[str]
) -> tuple[list[list[int]], list[tuple[int, int]], list[str]]:
    """Each prompt followed by each answer word (capitalized, as the few-shot answers are):
    (sequences, the answer word's span in each, the word of each); prompt-major order."""
    out, spans, which = [], [], []
    for seq in seqs:
        for word in words:
            ids = list(tokenizer.encode(word.capitalize(), add_special_tokens=False))
            if not ids:
                raise ValueError(f"answer word {word!r} encodes to no tokens")
            full = [int(t) for t in seq] + [int(t) for t in ids]
            out.append(full)
            spans.append((len(full) - len(ids), len(full)))
            which.append(word)
    return out, spans, which
