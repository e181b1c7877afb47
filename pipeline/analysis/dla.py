"""Direct logit attribution: how much each component writes the answer's logit difference.

The final residual at a position is the sum of what the embedding, every attention block
and every MLP block added to it. Read through the final norm with its scale frozen at that
final residual (TransformerLens's ``apply_ln_to_stack`` convention: one RMS scale for every
component) and through the unembedding along ``W_U[plus] - W_U[minus]``, each component gets
a share of the logit difference; the shares add up to the model's own logit difference, and
``remainder`` holds what is not a sum of components (a head bias, gemma2's soft-capping).
Blocks that norm an output before adding it (gemma2/3, olmo2: ``post_attn_norm``,
``post_mlp_norm`` of the anatomy) count what they add, the normed output. Per head, each
head's output through its slice of the output projection (a bias of the projection is not a
head's, so the heads of a layer add up to its attention output minus that bias), through a
post-attention norm with its scale frozen at the attention output. A LayerNorm (gpt2) is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.analysis.lens import LensError, _head_rows, final_norm, frozen_rms_scale, unembed
from mlx_interp.interventions.capture import padded_batch
from mlx_interp.interventions.patching import token_rows
from mlx_interp.interventions.resume import module_of, n_layers_of, record_base
from mlx_interp.models.anatomy import anatomy_of

__all__ = ["LogitAttribution", "direct_logit_attribution", "frozen_rms_scale"]


@dataclass(frozen=True)
class LogitAttribution:
    """Per prompt: ``embed`` ``[n]``, ``attn`` and ``mlp`` ``[n, n_layers]``, ``heads``
    ``[n, n_layers, n_heads]`` (None unless asked), ``remainder`` ``[n]`` and the model's own
    ``logit_diff`` ``[n]``: ``embed + attn.sum(1) + mlp.sum(1) + remainder == logit_diff``."""

    embed: np.ndarray
    attn: np.ndarray
    mlp: np.ndarray
    heads: np.ndarray | None
    remainder: np.ndarray
    logit_diff: np.ndarray

    def components(self) -> tuple[list[str], np.ndarray]:
        """Labels ``embed, attn 0, mlp 0, attn 1, ...`` and values ``[n, 1 + 2 * n_layers]``."""
        n_layers = self.attn.shape[1]
        labels = ["embed"] + [f"{k} {i}" for i in range(n_layers) for k in ("attn", "mlp")]
        blocks = np.stack([self.attn, self.mlp], axis=2).reshape(len(self.embed), -1)
        return labels, np.concatenate([self.embed[:, None], blocks], axis=1)


def _ids_per_prompt(ids: Any, n: int, what: str) -> list[int]:
    if isinstance(ids, (int, np.integer)):
        return [int(ids)] * n
    ids = [int(i) for i in ids]
    if len(ids) != n:
        raise LensError(f"{what}: {len(ids)} token ids for {n} prompts (one each, or one int)")
    return ids


def direct_logit_attribution(
    model: Any,
    prompts: Any,
    answers: tuple[Any, Any],
    position: int = -1,
    per_head: bool = True,
    pad_id: int = 0,
) -> LogitAttribution:
    """Each component's share of ``logit(plus) - logit(minus)`` at ``position`` (default the
    last token of each prompt; negative counts from each prompt's end).

    ``answers=(plus, minus)``: token ids, one each or one per prompt (strings with an
    ``mlx_interp.Model``)."""
    from mlx_interp.interventions.patching import _answer_ids, _unwrap

    module, rows = token_rows(model, prompts, "prompts")
    wrapper = _unwrap(model)[1]
    plus = _ids_per_prompt(_answer_ids(answers[0], wrapper), len(rows), "plus")
    minus = _ids_per_prompt(_answer_ids(answers[1], wrapper), len(rows), "minus")
    tokens, lengths = padded_batch(rows, pad_id)
    at = [position % n for n in lengths]
    kinds = ["resid_pre", "attn_out", "mlp_out", *(["z"] if per_head else [])]
    run = record_base(module, tokens, at, kinds, keep_kv=False)
    n_layers = n_layers_of(module)
    pick = (mx.arange(len(rows)), mx.array(at))

    def at_position(h: mx.array) -> mx.array:
        return h[pick].astype(mx.float32)  # [n, ...]

    final = at_position(run.resid[n_layers])  # [n, d]
    gain, scale = frozen_rms_scale(final_norm(module), final)
    rows_w = mx.array(_head_rows(module, sorted(set(plus) | set(minus))).astype(np.float32))
    column = {t: c for c, t in enumerate(sorted(set(plus) | set(minus)))}
    direction = (
        rows_w[mx.array([column[t] for t in plus])] - rows_w[mx.array([column[t] for t in minus])]
    )  # [n, d]
    read = gain * direction * scale  # [n, d]: one component's dot product gives its share

    def share(h: mx.array) -> mx.array:
        return (h * read).sum(-1)

    embed = share(at_position(run.resid[0]))
    attn, mlp, heads = [], [], []
    anatomy = anatomy_of(module)
    for i in range(n_layers):
        parts = anatomy.layer(i)
        a, m = at_position(run.sites[("attn_out", i)]), at_position(run.sites[("mlp_out", i)])
        # a norm after the attention block (gemma2/3, olmo2), its scale frozen
        post: float | mx.array = 1.0
        if parts.post_attn_norm is not None:
            gain_a, scale_a = frozen_rms_scale(parts.post_attn_norm, a)
            post, a = gain_a * scale_a, parts.post_attn_norm(a).astype(mx.float32)
        if parts.post_mlp_norm is not None:
            m = parts.post_mlp_norm(m).astype(mx.float32)
        block = at_position(run.resid[i + 1]) - at_position(run.resid[i])
        _check_added(block, a, m, i)
        attn.append(share(a))
        mlp.append(share(m))
        if per_head:
            z = at_position(run.sites[("z", i)])
            heads.append(_head_shares(module, i, z, read * post))
    logits = unembed(module, final)
    index = mx.arange(len(rows))
    own = logits[index, mx.array(plus)] - logits[index, mx.array(minus)]
    embed_np, own_np = np.array(embed), np.array(own.astype(mx.float32))
    attn_np, mlp_np = np.array(mx.stack(attn, 1)), np.array(mx.stack(mlp, 1))
    total = embed_np + attn_np.sum(1) + mlp_np.sum(1)
    return LogitAttribution(
        embed_np,
        attn_np,
        mlp_np,
        np.array(mx.stack(heads, 1)) if per_head else None,
        own_np.astype(np.float64) - total,
        own_np,
    )


def _check_added(block: mx.array, attn: mx.array, mlp: mx.array, layer: int) -> None:
    """The block's change of the residual must be what its attention and MLP add (their
    outputs, through the post-norms the anatomy names): else the split would be wrong."""
    error = mx.abs(block - attn - mlp).max() / mx.maximum(mx.abs(block).max(), 1e-30)
    if not float(error) <= 1e-3:
        raise LensError(
            f"layer {layer} changes the residual by more than its attention and MLP add "
            f"(relative error {error.item():.2g}); name the block's norms with the config key "
            "model.anatomy (post_attn_norm, post_mlp_norm) if the model has others"
        )


def _head_shares(model: Any, layer: int, z: mx.array, read: mx.array) -> mx.array:
    """``[n, n_heads]``: each head's output through the output projection (bias removed),
    dotted with ``read`` ``[n, d]``; ``z`` is ``[n, n_heads, head_dim]``."""
    o_proj = module_of(model, layer, "z")
    n, n_heads, head_dim = z.shape
    one_hot = mx.eye(n_heads, dtype=z.dtype)[None, :, :, None]  # [1, H, H, 1]
    alone = (z[:, None, :, :] * one_hot).reshape(n, n_heads, n_heads * head_dim)
    out = o_proj(alone) - o_proj(mx.zeros((1, 1, n_heads * head_dim), dtype=z.dtype))
    return (out.astype(mx.float32) * read[:, None, :]).sum(-1)


def mean_by_component(dla: LogitAttribution) -> dict[str, float]:
    """Component label -> mean share over prompts (with ``remainder`` and ``logit_diff``)."""
    labels, values = dla.components()
    out = dict(zip(labels, values.mean(0).tolist(), strict=True))
    out["remainder"] = float(dla.remainder.mean())
    out["logit_diff"] = float(dla.logit_diff.mean())
    return out
