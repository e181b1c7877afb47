"""Reference activation patching for tests: plain full forwards without any cache, with the
patch written by a class swap here (independent of mlx_interp's patching code)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlx_interp.interventions.classswap import swapped
from mlx_interp.interventions.sites import Site, head_shape, site_module


def site_owner(model: Any, kind: str, layer: int) -> Any:
    """The module whose call carries ``kind`` (resid_pre: the block's input)."""
    if kind in ("resid_pre", "resid_post"):
        return model.layers[layer]
    old = {"attn_out": "attn", "mlp_out": "mlp", "z": "heads"}[kind]
    return site_module(model, Site(layer, old))


def reference_values(model: Any, tokens: Any, kind: str, layer: int) -> mx.array:
    """The value of a site in a plain forward: [n, T, d] (z: [n, T, heads, head_dim])."""
    got = {}
    n_heads = head_shape(model, layer)[0] if kind == "z" else 0
    module = site_owner(model, kind, layer)
    original = type(module).__call__

    def call(self, *args, **kwargs):
        if kind == "resid_pre":
            got["v"] = args[0]
        if kind == "z":
            x = args[0]
            got["v"] = x.reshape(*x.shape[:-1], n_heads, -1)
        out = original(self, *args, **kwargs)
        if kind in ("resid_post", "attn_out", "mlp_out"):
            got["v"] = out[0] if isinstance(out, tuple) else out
        return out

    with swapped(module, "Ref", call):
        model(mx.array(tokens))
    return got["v"]


def plain_patched_logits(
    model: Any, corrupt: Any, kind: str, layer: int, mask: Any, head: Any, source: mx.array
) -> mx.array:
    """Last-token logits ``[n, vocab]`` of a full, uncached forward of ``corrupt`` with
    ``source`` written into the site where ``mask`` [n, T] is true (and ``head``)."""
    mask = mx.array(mask)
    module = site_owner(model, kind, layer)
    original = type(module).__call__

    def call(self, *args, **kwargs):
        if kind in ("resid_pre", "z"):
            x = args[0]
            if kind == "z":
                heads = x.reshape(*source.shape)
                m = mask[..., None, None]
                if head is not None:
                    m = m & (mx.arange(source.shape[2]) == head)[None, None, :, None]
                x = mx.where(m, source, heads).reshape(x.shape)
            else:
                x = mx.where(mask[..., None], source, x)
            return original(self, x, *args[1:], **kwargs)
        out = original(self, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = mx.where(mask[..., None], source, h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with swapped(module, "RefPatch", call):
        return model(mx.array(corrupt))[:, -1].astype(mx.float32)


def metric_with_values(
    model: Any,
    corrupt: Any,
    kind: str,
    layer: int,
    mask: Any,
    head: Any,
    source: mx.array,
    plus: int,
    minus: int,
) -> float:
    """Mean logit difference at the last token of :func:`plain_patched_logits`."""
    logits = plain_patched_logits(model, corrupt, kind, layer, mask, head, source)
    return float(mx.mean(logits[:, plus] - logits[:, minus]).item())


def reference_metric(model: Any, clean: Any, corrupt: Any, patch: Any, plus: int, minus: int):
    """The metric with ``patch`` (kind, layer, mask, head) applied by hand: the clean run's
    value written into the corrupted run."""
    source = reference_values(model, clean, patch.kind, patch.layer)
    return metric_with_values(
        model, corrupt, patch.kind, patch.layer, patch.mask, patch.head, source, plus, minus
    )
