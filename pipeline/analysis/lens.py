"""Logit lens: each layer's residual read through the model's final norm and unembedding.

:func:`unembed` maps a residual ``[..., d_model]`` to logits ``[..., vocab]`` exactly as the
model's own head does after its last layer (the anatomy's final norm, head and any logit
soft-capping), so at the last layer the lens equals the model's logits.
:func:`logit_lens` reads every layer (or some) at every position (or some) of a batch of
prompts; :func:`lens_logit_diff` gives, per prompt, layer and position role, the logit
difference of two answer words (max over each word's first-token spellings), for the
logit_lens stage. Both read the residuals of one recorded forward
(:func:`mlx_interp.interventions.resume.record_base`). Direct logit attribution is
:mod:`mlx_interp.analysis.dla`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_interp.interventions.capture import padded_batch, resolve_layers
from mlx_interp.interventions.patching import token_rows
from mlx_interp.interventions.positions import ROLES, role_positions
from mlx_interp.interventions.prefix import expand_cache, shared_prefix
from mlx_interp.interventions.resume import n_layers_of, record_base
from mlx_interp.models.anatomy import anatomy_of
from mlx_interp.models.loading import ModelLoadError


class LensError(ModelLoadError):
    """A model whose final norm or unembedding cannot be read as the lens needs."""


def final_norm(model: Any) -> Any:
    """The norm after the last layer (the anatomy's ``final_norm``)."""
    return anatomy_of(model).final_norm


def unembed(model: Any, h: mx.array) -> mx.array:
    """``[..., d_model]`` residual -> ``[..., vocab]`` logits via the final norm and head."""
    return anatomy_of(model).unembed(h)


def unembed_ids(model: Any, h: mx.array, ids: Sequence[int]) -> mx.array:
    """``[..., d_model]`` residual -> ``[..., len(ids)]``: the logits of ``ids`` only, equal
    to ``unembed(model, h)[..., ids]``. A plain (unquantized) head multiplies by its rows of
    ``ids`` alone; any other head runs whole."""
    anatomy = anatomy_of(model)
    index = mx.array(list(ids), dtype=mx.int32)
    head = anatomy.lm_head
    layer = head if head is not None else anatomy.embed
    if type(layer) not in (nn.Linear, nn.Embedding):
        return unembed(model, h)[..., index]
    out = anatomy.final_norm(h) @ layer.weight[index].T
    bias = layer.get("bias") if head is not None else None
    out = out if bias is None else out + bias[index]
    cap = anatomy.final_softcap
    return mx.tanh(out / cap) * cap if cap else out


def frozen_rms_scale(norm: Any, x: mx.array) -> tuple[mx.array, mx.array]:
    """(``gain`` ``[d]``, ``scale`` ``[..., 1]``) with ``norm(x) == scale * gain * x`` for an
    RMS norm, read from the norm itself: the gain is its output for a constant vector (large,
    so that its epsilon does not count; a ``1 + w`` gain comes out right), the scale is fitted
    at ``x`` (its epsilon included); refused
    (:class:`LensError`) for a norm not of that form (a mean-subtracting LayerNorm)."""
    x = x.astype(mx.float32)
    gain = norm(mx.full((1, x.shape[-1]), 1e3, dtype=mx.float32))[0].astype(mx.float32)
    normed = norm(x).astype(mx.float32)
    gx = gain * x
    squared = mx.maximum((gx * gx).sum(-1, keepdims=True), 1e-30)
    scale = (normed * gx).sum(-1, keepdims=True) / squared
    error = mx.abs(normed - scale * gx).max() / mx.maximum(mx.abs(normed).max(), 1e-30)
    if not float(error) <= 1e-3:
        raise LensError(
            f"{type(norm).__name__} is not an RMS norm (norm(x) != scale * gain * x, relative "
            f"error {error.item():.2g}): reading a residual through it linearly needs "
            "norm(h) = h / rms(h) * gain"
        )
    return gain, scale


def logit_lens(
    model: Any,
    prompts: Any,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    ids: Sequence[int] | None = None,
    pad_id: int = 0,
) -> np.ndarray:
    """float32 ``[n_prompts, len(layers), len(positions), vocab]`` (or ``len(ids)`` in the last
    axis): the residual after each layer read through the final norm and unembedding.

    ``prompts``: token ids (one list or several, right-padded here) or strings with an
    ``mlx_interp.Model``; ``layers``: default all (negative ok); ``positions``: default every
    position of the shortest prompt, negative ones count from each prompt's own end. At the
    last layer the lens is the model's logits."""
    module, rows = token_rows(model, prompts, "prompts")
    tokens, lengths = padded_batch(rows, pad_id)
    layers = resolve_layers(layers, n_layers_of(module))
    positions = list(range(min(lengths))) if positions is None else [int(p) for p in positions]
    picked = np.array([[p % n for p in positions] for n in lengths])  # [n, P]
    if any(not -n <= p < n for p in positions for n in lengths):
        raise LensError(f"positions {positions} outside a prompt of {min(lengths)} tokens")
    run = record_base(module, tokens, [n - 1 for n in lengths], ["resid_pre"], keep_kv=False)
    index = mx.array(picked)
    rows_index = mx.arange(len(rows))[:, None]
    out = []
    for layer in layers:
        h = run.resid[layer + 1][rows_index, index]  # [n, P, d_model]
        logits = unembed(module, h) if ids is None else unembed_ids(module, h, ids)
        out.append(logits.astype(mx.float32))
    return np.array(mx.stack(out, axis=1))


def lens_logit_diff(
    model: Any,
    seqs: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    plus_ids: Sequence[Sequence[int]],
    minus_ids: Sequence[Sequence[int]],
    pad_id: int = 0,
    batch_size: int = 16,
) -> np.ndarray:
    """float32 ``[n, n_layers, len(ROLES)]``: through the lens, max logit over ``plus_ids[i]``
    minus max logit over ``minus_ids[i]``, at the last object token (``object``), averaged
    over the tokens after it (``after``; NaN when there are none) and at the last token."""
    seqs = [[int(t) for t in s] for s in seqs]
    n_layers = n_layers_of(model)
    out = np.full((len(seqs), n_layers, len(ROLES)), np.nan, np.float32)
    p, cache0 = shared_prefix(model, seqs)
    if cache0 is not None and min(s for s, _ in spans) < p:
        p, cache0 = 0, None
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = [int(i) for i in order[begin : begin + batch_size]]
        tokens, lengths = padded_batch([seqs[i][p:] for i in rows], pad_id)
        cache = expand_cache(cache0, len(rows)) if cache0 is not None else None
        last = [n - 1 for n in lengths]
        run = record_base(model, tokens, last, ["resid_pre"], keep_kv=False, cache=cache)
        picks = []  # (row in batch, position in suffix, prompt, role index)
        for r, i in enumerate(rows):
            roles = role_positions(spans[i], len(seqs[i]))
            chosen = (roles["object"][-1:], roles["after"], roles["last"])
            picks += [(r, j - p, i, k) for k, js in enumerate(chosen) for j in js]
        row_idx = mx.array([a for a, _, _, _ in picks], dtype=mx.int32)
        pos_idx = mx.array([b for _, b, _, _ in picks], dtype=mx.int32)
        vocab = sorted({int(t) for i in rows for t in (*plus_ids[i], *minus_ids[i])})
        column = {t: c for c, t in enumerate(vocab)}
        for layer in range(n_layers):
            h = run.resid[layer + 1][row_idx, pos_idx]  # [picks, d_model]
            logits = np.array(unembed_ids(model, h, vocab).astype(mx.float32))  # [picks, ids]
            sums = np.zeros((len(seqs), len(ROLES)))
            counts = np.zeros((len(seqs), len(ROLES)))
            for m, (_, _, i, k) in enumerate(picks):
                row = logits[m]
                plus = row[[column[t] for t in plus_ids[i]]].max()
                sums[i, k] += plus - row[[column[t] for t in minus_ids[i]]].max()
                counts[i, k] += 1
            for i in rows:
                seen = counts[i] > 0
                out[i, layer, seen] = sums[i, seen] / counts[i, seen]
    return out


def _head_rows(model: Any, ids: Sequence[int]) -> np.ndarray:
    """float64 ``[len(ids), d_model]``: the unembedding rows of ``ids`` (the head's weight,
    or the tied embedding), dequantized when the head is quantized."""
    return np.array(anatomy_of(model).head_rows(ids), dtype=np.float64)


def norm_gain(model: Any) -> np.ndarray:
    """float64 ``[d_model]``: the elementwise gain of the model's final RMS norm (a ``1 + w``
    gain, as in Gemma, comes out right). Refused for a norm that is not of that form (e.g. a
    mean-subtracting LayerNorm)."""
    anatomy = anatomy_of(model)
    if anatomy.d_model is None:
        raise LensError(f"{type(model).__name__} declares no width (d_model) to probe its norm")
    x = 3 * mx.random.normal((4, anatomy.d_model), key=mx.random.key(0))
    gain, _ = frozen_rms_scale(anatomy.final_norm, x)
    return np.array(gain, dtype=np.float64)


def answer_direction(model: Any, pos_ids: Sequence[int], neg_ids: Sequence[int]) -> np.ndarray:
    """float64 ``[d_model]``: the residual direction that raises the mean logit of
    ``pos_ids`` over that of ``neg_ids`` through the final norm and unembedding,
    ``gain * (mean W[pos_ids] - mean W[neg_ids])``.

    The final RMS norm only rescales a residual, so for any residual ``h`` the sign of
    ``h . answer_direction`` is the sign of the logit lens's mean(pos) - mean(neg) logit
    difference (a head bias aside), and a reflection through the origin across it negates
    that difference exactly. Read at an intermediate layer it is the logit lens's answer
    axis, not a concept fitted from data."""
    if not pos_ids or not neg_ids:
        raise LensError("answer_direction needs token ids for both words")
    gain = norm_gain(model)
    rows = _head_rows(model, [*pos_ids, *neg_ids])
    return gain * (rows[: len(pos_ids)].mean(axis=0) - rows[len(pos_ids) :].mean(axis=0))
