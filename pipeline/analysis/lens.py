"""Logit lens: each layer's residual read through the model's final norm and unembedding.

:func:`unembed` maps a residual ``[..., d_model]`` to logits ``[..., vocab]`` exactly as the
model's own head does after its last layer (mlx-lm: ``model.model.norm``, then ``lm_head``
or the tied embedding), so at the last layer the lens equals the model's logits (for models
that transform the head's output further, e.g. gemma2's logit soft-capping, it equals them
before that transform).
:func:`logit_lens` reads every layer (or some) at every position (or some) of a batch of
prompts; :func:`lens_logit_diff` gives, per prompt, layer and position role, the logit
difference of two answer words (max over each word's first-token spellings), for the
logit_lens stage. Direct logit attribution is :mod:`mlx_interp.analysis.dla`.
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
from mlx_interp.interventions.classswap import model_width
from mlx_interp.interventions.positions import ROLES, role_positions
from mlx_interp.interventions.prefix import expand_cache, shared_prefix
from mlx_interp.models.loading import ModelLoadError


class LensError(ModelLoadError):
    """A model whose final norm or unembedding cannot be found."""


def final_norm(model: Any) -> Any:
    """The norm after the last layer."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None:
        raise LensError(
            f"{type(model).__name__} has no model.norm: the logit lens needs an mlx-lm model "
            "whose body ends in a final norm (llama, qwen2, mistral, ...)"
        )
    return norm


def unembed(model: Any, h: mx.array) -> mx.array:
    """``[..., d_model]`` residual -> ``[..., vocab]`` logits via the final norm and head."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise LensError(
            f"{type(model).__name__} has no model.norm: the logit lens needs an mlx-lm model "
            "whose body ends in a final norm (llama, qwen2, mistral, ...)"
        )
    h = norm(h)
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head(h)
    embed = getattr(inner, "embed_tokens", None)
    if embed is None or not hasattr(embed, "as_linear"):
        raise LensError(f"{type(model).__name__} has neither lm_head nor tied embed_tokens")
    return embed.as_linear(h)


def unembed_ids(model: Any, h: mx.array, ids: Sequence[int]) -> mx.array:
    """``[..., d_model]`` residual -> ``[..., len(ids)]``: the logits of ``ids`` only, equal
    to ``unembed(model, h)[..., ids]``. A plain (unquantized) head multiplies by its rows of
    ``ids`` alone; any other head runs whole."""
    import mlx.nn as nn

    index = mx.array(list(ids), dtype=mx.int32)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None and type(embed) is nn.Embedding:
        weight, bias = embed.weight, None
    elif type(head) is nn.Linear:
        weight, bias = head.weight, head.get("bias")
    else:
        return unembed(model, h)[..., index]
    normed = model.model.norm(h)
    out = normed @ weight[index].T
    return out if bias is None else out + bias[index]


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
    from mlx_interp.interventions.patching import token_rows
    from mlx_interp.interventions.resume import record_base

    module, rows = token_rows(model, prompts, "prompts")
    tokens, lengths = padded_batch(rows, pad_id)
    layers = resolve_layers(layers, len(decoder_layers(module)))
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
    n_layers = len(decoder_layers(model))
    out = np.full((len(seqs), n_layers, len(ROLES)), np.nan, np.float32)
    p, cache0 = shared_prefix(model, seqs)
    if cache0 is not None and min(s for s, _ in spans) < p:
        p, cache0 = 0, None
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = [int(i) for i in order[begin : begin + batch_size]]
        tokens, _ = padded_batch([seqs[i][p:] for i in rows], pad_id)
        cache = expand_cache(cache0, len(rows)) if cache0 is not None else None
        with capture_layers(model, None) as rec:
            model(tokens, **({} if cache is None else {"cache": cache}))
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
            h = rec.outputs[layer][row_idx, pos_idx]  # [picks, d_model]
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
        rec.outputs.clear()
    return out


def _head_rows(model: Any, ids: Sequence[int]) -> np.ndarray:
    """float64 ``[len(ids), d_model]``: the unembedding rows of ``ids`` (the head's weight,
    or the tied embedding), dequantized when the head is quantized."""
    import mlx.nn as nn

    index = mx.array(list(ids), dtype=mx.int32)
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    layer = head if head is not None else getattr(inner, "embed_tokens", None)
    if layer is None or not hasattr(layer, "weight"):
        raise LensError(f"{type(model).__name__} has neither lm_head nor tied embed_tokens")
    if isinstance(layer, nn.QuantizedLinear | nn.QuantizedEmbedding):
        rows = mx.dequantize(
            layer.weight[index],
            layer.scales[index],
            layer.biases[index] if layer.get("biases") is not None else None,
            layer.group_size,
            layer.bits,
        )
    else:
        rows = layer.weight[index]
    return np.array(rows.astype(mx.float32), dtype=np.float64)


def norm_gain(model: Any) -> np.ndarray:
    """float64 ``[d_model]``: the elementwise gain of the model's final RMS norm, read by
    running the norm on a vector of ones (so a ``1 + w`` gain, as in Gemma, comes out right).
    Refused for a norm that is not of that form (e.g. a mean-subtracting LayerNorm)."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise LensError(f"{type(model).__name__} has no model.norm: cannot read its final norm")
    d = model_width(model) or _d_model(model)
    ones = mx.ones((1, d), dtype=mx.float32)
    gain = np.array(norm(ones).astype(mx.float32), dtype=np.float64)[0]
    doubled = np.array(norm(2 * ones).astype(mx.float32), dtype=np.float64)[0]
    if not np.allclose(gain, doubled, rtol=1e-4, atol=1e-6) or not np.abs(gain).max() > 0:
        raise LensError(
            f"{type(norm).__name__} is not a scale-invariant RMS norm: the answer-word "
            "direction needs norm(h) = h / rms(h) * gain"
        )
    return gain


def _d_model(model: Any) -> int:
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and hasattr(embed, "weight"):
        weight = embed.weight
        if weight.dtype == mx.uint32:  # quantized: packed columns
            return int(embed.scales.shape[-1] * embed.group_size)
        return int(weight.shape[-1])
    raise LensError(f"{type(model).__name__}: cannot tell its residual width")


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
