"""Activation patching: how much of a clean-vs-corrupted logit difference one site carries.

A clean prompt (e.g. a green object) and a corrupted one (a red object, same template and
token count) are run; then the corrupted prompt again with one site's output, at the
positions of one role (``ROLES`` of :mod:`mlx_interp.interventions.positions`, or ``all``),
replaced by the clean run's. Sites (``kinds``): ``resid``, the residual after a decoder
layer; ``attn``, the attention block's output; ``mlp``, the MLP's output (the same modules
as :mod:`mlx_interp.interventions.sites`), each before it is added to the residual.
With LD = logit(clean word) - logit(corrupted word) at the last token, the share
recovered is ``(mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)``
over the pairs: 1 = the site carries the whole difference, 0 = none of it. The patch is a
class swap on the site's module (no hooks), restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.engine.schema import PATCH_KINDS
from mlx_interp.interventions.capture import (
    decoder_layers,
    padded_batch,
    subclass_with_call,
)
from mlx_interp.interventions.modes import SteeringError
from mlx_interp.interventions.positions import ROLES, role_positions
from mlx_interp.interventions.prefix import (
    batched_last_logits,
    expand_cache,
    last_logits,
    shared_prefix,
)
from mlx_interp.interventions.sites import Site, capture_sites, site_module

PATCH_ROLES = (*ROLES, "all")


class PatchingError(SteeringError):
    """Pairs that cannot be patched position by position (different lengths or spans)."""


@contextmanager
def patch_site(model: Any, site: Site, mask: mx.array, values: mx.array) -> Iterator[None]:
    """Inside, ``site``'s output ``[batch, seq, d_model]`` takes ``values`` where ``mask``
    [batch, seq] is true (forwards of another shape are left alone)."""
    if site.kind not in {Site(0, kind).kind for kind in PATCH_KINDS}:  # resid = resid_post...
        raise PatchingError(f"cannot patch site kind {site.kind!r}; use one of {PATCH_KINDS}")
    module = site_module(model, site)
    original = type(module)
    original_call = original.__call__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = original_call(self, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if tuple(h.shape[:2]) == tuple(mask.shape):
            h = mx.where(mask[..., None], values.astype(h.dtype), h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    module.__class__ = subclass_with_call(original, "Patching", __call__)
    try:
        yield
    finally:
        module.__class__ = original


def _ld(logits: np.ndarray, plus: Sequence[Sequence[int]], minus) -> np.ndarray:
    return np.array(
        [
            row[list(a)].max() - row[list(b)].max()
            for row, a, b in zip(logits, plus, minus, strict=True)
        ]
    )


def patching_recovery(
    model: Any,
    clean: Sequence[Sequence[int]],
    corrupt: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    plus_ids: Sequence[Sequence[int]],
    minus_ids: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    pad_id: int = 0,
    roles: Sequence[str] = PATCH_ROLES,
    kinds: Sequence[str] = ("resid",),
) -> dict[str, Any]:
    """Share recovered per (layer, role): ``recovery`` float ``[len(layers), len(PATCH_ROLES)]``,
    plus ``ld_clean``/``ld_corrupt`` per pair [n]. ``spans`` is the object span of each pair
    (the same in both prompts); ``plus_ids``/``minus_ids`` the clean/corrupted word's ids;
    ``roles`` a subset of :data:`PATCH_ROLES` (``all`` recovers 1 by construction: a check);
    ``kinds`` the sites patched (:data:`PATCH_KINDS`): ``by_kind`` holds each one's array, and
    ``recovery`` the first kind's."""
    bad_kinds = [k for k in kinds if k not in PATCH_KINDS]
    if bad_kinds or not kinds:
        raise PatchingError(f"patching kinds must be a non-empty subset of {PATCH_KINDS}")
    unknown = [r for r in roles if r not in PATCH_ROLES]
    if unknown:
        raise PatchingError(f"unknown patching role(s) {unknown}; use {PATCH_ROLES}")
    clean = [[int(t) for t in s] for s in clean]
    corrupt = [[int(t) for t in s] for s in corrupt]
    for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)):
        if len(a) != len(b):
            raise PatchingError(
                f"pair {i}: clean has {len(a)} tokens, corrupted {len(b)}; patching by position "
                "needs pairs of one template with objects of equal token count"
            )
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    p, cache0 = shared_prefix(model, clean + corrupt)
    if cache0 is not None and min(s for s, _ in spans) < p:
        p, cache0 = 0, None
    prefix = (p, cache0)
    ld_clean = _ld(batched_last_logits(model, clean, pad_id, 16, prefix), plus_ids, minus_ids)
    ld_corrupt = _ld(batched_last_logits(model, corrupt, pad_id, 16, prefix), plus_ids, minus_ids)
    gap = float(ld_clean.mean() - ld_corrupt.mean())
    tokens, lengths = padded_batch([s[p:] for s in corrupt], pad_id)
    clean_tokens, _ = padded_batch([s[p:] for s in clean], pad_id)
    width = tokens.shape[1]
    masks = {}
    for role in roles:
        m = np.zeros((len(clean), width), bool)
        for i, n in enumerate(lengths):
            if role == "all":
                m[i, :n] = True
            else:
                idx = [j - p for j in role_positions(spans[i], n + p)[role]]
                m[i, idx] = True
        masks[role] = mx.array(m)
    cache = expand_cache(cache0, len(clean)) if cache0 is not None else None
    sites = [Site(layer, kind) for kind in kinds for layer in layers]
    with capture_sites(model, sites) as rec:
        model(clean_tokens, **({} if cache is None else {"cache": cache}))
        mx.eval(list(rec.outputs.values()))
    clean_out = dict(rec.outputs)
    last = [n - 1 for n in lengths]
    by_kind = {}
    for kind in kinds:
        recovery = np.full((len(layers), len(roles)), np.nan)
        for a, layer in enumerate(layers):
            site = Site(layer, kind)
            for k, role in enumerate(roles):
                cache = expand_cache(cache0, len(corrupt)) if cache0 is not None else None
                with patch_site(model, site, masks[role], clean_out[site.name]):
                    logits = last_logits(model, tokens, last, cache)
                ld = _ld(np.array(logits.astype(mx.float32)), plus_ids, minus_ids)
                recovery[a, k] = (ld.mean() - ld_corrupt.mean()) / gap if gap else np.nan
        by_kind[kind] = recovery
    return {
        "layers": layers,
        "roles": list(roles),
        "recovery": by_kind[kinds[0]],
        "by_kind": by_kind,
        "ld_clean": ld_clean,
        "ld_corrupt": ld_corrupt,
    }
