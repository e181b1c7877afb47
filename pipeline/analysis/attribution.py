"""Attribution patching: a linear estimate of every activation patch from one backward pass.

Patching the clean value ``c`` of a site into the corrupted run changes the metric by about
``grad . (c - x)``, with ``x`` the corrupted value and ``grad`` the metric's gradient there
(Nanda, "Attribution patching", 2023; TransformerLens's attribution-patching demo). One
forward of the corrupted prompts adds a zero to every site (the residual entering each layer,
the final residual, each block's attention and MLP outputs, each head's output ``z``), and
``mx.value_and_grad`` differentiates the metric with respect to all of them at once. The
estimates come normalised like real patching (:mod:`mlx_interp.interventions.patching`): 0 =
the corrupted metric, 1 = the clean one, per layer x position (x head for ``z``).

It is a first-order estimate: good where the metric is close to linear in the site (late
layers, attention outputs, heads), poor where a patch changes a lot at once (an early
residual at the token that differs). Compare with real patching before trusting it
(``bench/patching.py`` reports the correlation on name-mover prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.capture import resolve_layers
from mlx_interp.interventions.patching import (
    PatchingResult,
    kind_name,
    metric_gap,
    prepare_pairs,
)
from mlx_interp.interventions.resume import (
    last_position_logits,
    n_heads_of,
    n_layers_of,
    record_base,
    wrapped_calls,
)

__all__ = ["attribution_patching"]


def _with_deltas(model: Any, deltas: dict, kinds: Sequence[str]) -> dict:
    """Class-swap wrappers that add ``deltas[(kind, layer)]`` to each site's value (and keep
    the value seen, for the activation difference)."""
    n_layers = n_layers_of(model)
    seen: dict = {}
    wrappers: dict = {}

    def layer_input(i: int) -> Callable:
        def wrapper(original, self, x, *args, **kwargs):
            x = x + deltas[("resid_pre", i)]
            seen[("resid_pre", i)] = x
            out = original(self, x, *args, **kwargs)
            if i == n_layers - 1:  # the final residual: resid_post of the last layer
                h = (out[0] if isinstance(out, tuple) else out) + deltas[("resid_pre", n_layers)]
                seen[("resid_pre", n_layers)] = h
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return out

        return wrapper

    def block_output(kind: str, i: int) -> Callable:
        def wrapper(original, self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            h = (out[0] if isinstance(out, tuple) else out) + deltas[(kind, i)]
            seen[(kind, i)] = h
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return wrapper

    def heads_input(i: int, n_heads: int) -> Callable:
        def wrapper(original, self, x, *args, **kwargs):
            heads = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads) + deltas[("z", i)]
            seen[("z", i)] = heads
            return original(self, heads.reshape(x.shape), *args, **kwargs)

        return wrapper

    for i in range(n_layers):
        wrappers[("resid_pre", i)] = layer_input(i)
        for kind in ("attn_out", "mlp_out"):
            if kind in kinds:
                wrappers[(kind, i)] = block_output(kind, i)
        if "z" in kinds:
            wrappers[("z", i)] = heads_input(i, n_heads_of(model, i))
    return {"wrappers": wrappers, "seen": seen}


def attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    kinds: Sequence[str] = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z"),
    answers: tuple[Any, Any] | None = None,
    metric: Callable[[mx.array], mx.array] | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, PatchingResult]:
    """Attribution-patching estimates of every kind at every layer x position (x head).

    Arguments as :func:`~mlx_interp.interventions.patching.patching_heatmaps`; one result per
    kind, shaped like real patching's, from one forward and one backward of the corrupted
    prompts (and one forward of the clean ones)."""
    pairs = prepare_pairs(model, clean, corrupted, answers, metric)
    module, metric = pairs.module, pairs.metric
    kinds = [kind_name(k) for k in kinds]
    n_layers = n_layers_of(module)
    layers = resolve_layers(layers, n_layers)
    width = pairs.clean.shape[1]
    last = [width - 1] * pairs.clean.shape[0]
    recorded = [k for k in kinds if k in ("attn_out", "mlp_out", "z")]
    base = record_base(module, pairs.clean, last, ["resid_pre", *recorded], keep_kv=False)
    assert base.logits is not None  # record_base returns the clean logits
    m_clean = float(mx.mean(metric(base.logits)))
    keys = [("resid_pre", i) for i in range(n_layers + 1)]
    keys += [(k, i) for k in recorded for i in range(n_layers)]
    deltas = {key: mx.zeros_like(_clean_value(base, key)) for key in keys}

    def corrupted_metric(deltas: dict) -> tuple[mx.array, dict]:
        swaps = _with_deltas(module, deltas, kinds)
        with wrapped_calls(module, swaps["wrappers"]):
            logits = last_position_logits(module, pairs.corrupt, last)
        return mx.mean(metric(logits)), swaps["seen"]

    (metric_corrupt, seen), grads = mx.value_and_grad(corrupted_metric)(deltas)
    m_corrupt = float(metric_corrupt)
    gap = metric_gap(m_clean, m_corrupt)
    results = {}
    positions = list(range(width))
    for kind in kinds:
        per_layer = []
        for layer in layers:
            key = ("resid_pre", layer + 1) if kind == "resid_post" else (kind, layer)
            diff = _clean_value(base, key) - seen[key]
            change = (grads[key] * diff).sum(axis=-1).sum(axis=0)  # [T] (z: [T, heads])
            per_layer.append(change)
        estimate = np.array(mx.stack(per_layer).astype(mx.float32), dtype=np.float64)
        results[kind] = PatchingResult(
            kind, estimate / gap, m_corrupt + estimate, m_clean, m_corrupt, layers, positions
        )
    return results


def _clean_value(base: Any, key: tuple[str, int]) -> mx.array:
    kind, layer = key
    return base.resid[layer] if kind == "resid_pre" else base.sites[key]
