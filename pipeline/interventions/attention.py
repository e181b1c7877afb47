"""Explicit forwards of attention and of a decoder block, with every inner value exposed.

mlx-lm's attention runs fused (``mx.fast.scaled_dot_product_attention``): queries, keys,
values, scores and the pattern never exist as arrays. :func:`explicit_attention` computes
them one by one from the anatomy's parts, the same way the module does (projections or
fused qkv; q/k norms per head or full width; rope at the cache offset; the KV cache; the
model's scale, attention soft-capping and mask: causal, sliding window, padding), and runs
the hooks of each inner point on it:

- ``q`` ``[batch, seq, n_heads, head_dim]``, ``k``/``v`` ``[batch, seq, n_kv_heads,
  head_dim]`` (the kv heads the model computes; :func:`expand_kv` repeats them per query
  head), q and k after their norms and rope, for the positions of this forward (before the
  cache joins earlier ones);
- ``attn_scores`` ``[batch, n_heads, query, key]``: scale, softcap and mask applied (masked
  entries hold float32's lowest value), float32;
- ``pattern``: the softmax of the scores over keys, float32; ``z = pattern @ v`` per head,
  then the output projection (its input is the ``z`` site).

It replaces the module's ``__call__`` only while one of those points is hooked; the fused
path is untouched otherwise. :func:`explicit_block` does the same for a decoder block, to
expose ``resid_mid``. Both are checked against the module's own output on a random input
before first use (:func:`verify`), so a layout the anatomy misreads fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask

from mlx_interp.interventions.classswap import ModuleHooks, hooks_of, hooks_suspended
from mlx_interp.models.anatomy import Anatomy, AnatomyError, LayerParts

ATTENTION_POINTS = ("q", "k", "v", "attn_scores", "pattern")
BLOCK_POINTS = ("resid_mid",)
_LOWEST = float(np.finfo(np.float32).min)


def expand_kv(values: Any, n_heads: int, axis: int = 2) -> Any:
    """``[..., n_kv_heads, ...]`` keys or values -> one per query head (grouped-query
    attention: query head h reads kv head h // (n_heads / n_kv_heads)); mx or numpy."""
    repeats = n_heads // values.shape[axis]
    if repeats == 1:
        return values
    return (mx if isinstance(values, mx.array) else np).repeat(values, repeats, axis=axis)


def _apply_mask(scores: mx.array, mask: Any) -> mx.array:
    """Scores ``[batch, heads, query, key]`` with mlx-lm's mask applied (None, "causal", a
    bool array that keeps True, or an additive array)."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        n_query, n_key = scores.shape[-2:]
        mask = mx.arange(n_key - n_query, n_key)[:, None] >= mx.arange(n_key)[None]
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(_LOWEST, scores.dtype))
    return scores + mask.astype(scores.dtype)


def _heads(x: mx.array, count: int) -> mx.array:
    batch, seq, _ = x.shape
    return x.reshape(batch, seq, count, -1)


def explicit_attention(parts: LayerParts) -> Callable[..., mx.array]:
    """The explicit forward of ``parts.attn`` as a hooked ``__call__`` body."""
    n_heads, n_kv, head_dim, scale = parts.n_heads, parts.n_kv_heads, parts.head_dim, parts.scale
    if not (n_heads and n_kv and head_dim and scale):
        raise AnatomyError(f"layer {parts.index}: the attention's head counts are unknown")

    def forward(module: Any, hooks: ModuleHooks, x: mx.array, mask: Any = None, cache: Any = None):
        if cache is not None and hasattr(cache, "bits"):
            raise AnatomyError("attention sites do not support a quantized KV cache")
        if parts.qkv_proj is not None:
            qkv = parts.qkv_proj(x)
            cut = [n_heads * head_dim, (n_heads + n_kv) * head_dim]
            q, k, v = mx.split(qkv, cut, axis=-1)
        else:
            q, k, v = parts.q_proj(x), parts.k_proj(x), parts.v_proj(x)
        if parts.qk_norm == "full":
            q, k = parts.q_norm(q), parts.k_norm(k)
        q, k, v = _heads(q, n_heads), _heads(k, n_kv), _heads(v, n_kv)
        if parts.qk_norm == "head":
            q, k = parts.q_norm(q), parts.k_norm(k)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [batch, heads, seq, dim]
        if parts.rope is not None:
            offset = cache.offset if cache is not None else 0
            q, k = parts.rope(q, offset=offset), parts.rope(k, offset=offset)
        q, k, v = (_point(hooks, name, a) for name, a in (("q", q), ("k", k), ("v", v)))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        keys = expand_kv(k, n_heads, axis=1).astype(mx.float32)
        scores = (q.astype(mx.float32) * scale) @ keys.swapaxes(-1, -2)
        if parts.attn_softcap:
            scores = mx.tanh(scores / parts.attn_softcap) * parts.attn_softcap
        scores = hooks.apply("attn_scores", _apply_mask(scores, mask))
        pattern = hooks.apply("pattern", mx.softmax(scores, axis=-1, precise=True))
        z = pattern @ expand_kv(v, n_heads, axis=1).astype(mx.float32)
        batch, _, seq, _ = z.shape
        z = z.astype(x.dtype).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        return parts.o_proj(z)

    return forward


def _point(hooks: ModuleHooks, name: str, value: mx.array) -> mx.array:
    """``value`` ``[batch, heads, seq, dim]`` through the hooks of ``name``, which see it as
    ``[batch, seq, heads, dim]`` (TransformerLens's layout)."""
    if not hooks.has(name):
        return value
    return hooks.apply(name, value.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


def explicit_block(parts: LayerParts) -> Callable[..., mx.array]:
    """The explicit forward of decoder block ``parts.block``, exposing ``resid_mid``: the
    residual after the attention's contribution (post-norms included), before the MLP's."""
    add = parts.residual_add

    def forward(module: Any, hooks: ModuleHooks, x: mx.array, mask: Any = None, cache: Any = None):
        attn_in = parts.input_norm(x) if parts.input_norm is not None else x
        out = parts.attn(attn_in, mask, cache)
        if parts.post_attn_norm is not None:
            out = parts.post_attn_norm(out)
        h = hooks.apply("resid_mid", add(x, out))
        mlp_in = parts.pre_mlp_norm(h) if parts.pre_mlp_norm is not None else h
        out = parts.mlp(mlp_in)
        if parts.post_mlp_norm is not None:
            out = parts.post_mlp_norm(out)
        return add(h, out)

    return forward


def verify(anatomy: Anatomy, index: int, what: str) -> None:
    """Check the explicit ``attention`` or ``block`` forward of layer ``index`` against the
    module's own on a random 6-token input (hooks suspended); once per model and layer.
    Raises :class:`AnatomyError` naming ``model.anatomy`` when they differ."""
    if (what, index) in anatomy.verified:
        return
    parts = anatomy.layer(index)
    module = parts.attn if what == "attention" else parts.block
    make = explicit_attention if what == "attention" else explicit_block
    width = anatomy.d_model or _in_width(parts)
    dtype = parts.o_proj.weight.dtype if "scales" not in parts.o_proj else mx.float32
    dtype = dtype if mx.issubdtype(dtype, mx.floating) else mx.float32
    x = (mx.random.normal((1, 6, width), key=mx.random.key(index)) * 0.5).astype(dtype)
    mask = create_causal_mask(6)
    hooks = hooks_of(module)
    base = hooks.base if hooks is not None else type(module)
    try:
        with hooks_suspended():
            own = base.__call__(module, x, mask, None)
            mine = make(parts)(module, ModuleHooks(base), x, mask, None)
            expected, got = (np.array(a.astype(mx.float32)) for a in (own, mine))
    except Exception as err:  # a part missing or of the wrong shape
        raise AnatomyError(
            f"layer {index}: the explicit {what} forward cannot run on {type(module).__name__} "
            f"({type(err).__name__}: {err}); describe the layout with model.anatomy"
        ) from err
    scale = max(1.0, float(np.abs(expected).max()))
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    error = float(np.abs(expected - got).max())
    if not error <= tolerance * scale:
        raise AnatomyError(
            f"layer {index}: the explicit {what} forward differs from "
            f"{type(module).__name__}'s own by {error:.3g}; the anatomy misreads this "
            "architecture (norm placement, q/k norms, rope, scale?): describe it with the "
            "config key model.anatomy"
        )
    anatomy.verified.add((what, index))


def _in_width(parts: LayerParts) -> int:
    from mlx_interp.models.anatomy import in_features

    proj = parts.q_proj if parts.q_proj is not None else parts.qkv_proj
    return in_features(proj)
