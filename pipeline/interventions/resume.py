"""Resume a forward at a layer from stored states: the engine of fast activation patching.

A patch at layer ``s`` and position ``p`` leaves every layer below ``s`` and every position
before ``p`` as the unpatched (corrupted) run computed them. So :func:`record_base` runs the
prompts once and keeps each layer's input (``resid_pre``, plus the final residual), the
outputs of the attention and MLP blocks, the per-head attention outputs (``z``) and each
layer's keys and values; :func:`resumed_logits` then runs only layers ``>= s`` over positions
``>= a`` for many patched rows in one batch: the layers below ``s`` return the stored (and
patched) residual instead of computing, and the keys/values of positions ``< a`` come from
the stored run. The model's own forward does the rest (embedding shape, masks, sliding
windows, RoPE offsets, final norm, head), so the result equals a full forward with the same
patch (tested on tiny models of every architecture).

The model's structure comes from its anatomy (:mod:`mlx_interp.models.anatomy`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlx_interp.interventions.classswap import swapped
from mlx_interp.models.anatomy import anatomy_of

RECORDED = ("resid_pre", "attn_out", "mlp_out", "z")  # what a base run can keep, per layer
EDITED = ("attn_out", "mlp_out", "z")  # module outputs a resumed forward can overwrite


_ROLE = {
    "attn_out": ("attn", "attention"),
    "mlp_out": ("mlp", "MLP"),
    "z": ("o_proj", "output projection"),
}


def n_layers_of(model: Any) -> int:
    return anatomy_of(model).n_layers


def module_of(model: Any, layer: int, kind: str) -> Any:
    """The module whose call carries ``kind`` at ``layer``: the decoder block (resid_pre: its
    input), the attention or MLP block (their outputs), the output projection (z: its input)."""
    anatomy = anatomy_of(model)
    if kind == "resid_pre":
        return anatomy.layers[layer]
    role, what = _ROLE[kind]
    return anatomy.require(getattr(anatomy.layer(layer), role), role, what, layer)


def n_heads_of(model: Any, layer: int) -> int:
    anatomy = anatomy_of(model)
    return anatomy.require(anatomy.layer(layer).n_heads, "n_heads", "head count", layer)


def last_position_logits(
    model: Any, tokens: mx.array, last: Sequence[int], cache: list | None = None
) -> mx.array:
    """Logits ``[batch, vocab]`` at position ``last[i]`` of row ``i`` of ``tokens``: the
    model's body (final norm included), then the head and any logit soft-capping at those
    positions only, as the model's own head computes them."""
    anatomy = anatomy_of(model)
    normed = anatomy.body(tokens, cache=cache)
    h = normed[mx.arange(tokens.shape[0]), mx.array(list(last), dtype=mx.int32)]
    logits = anatomy.head(h)
    cap = anatomy.final_softcap
    return mx.tanh(logits / cap) * cap if cap else logits


class ConcatKV(KVCache):
    """A KV cache holding given keys/values ``[rows, kv_heads, a, head_dim]`` of positions
    ``< a`` (or none), to which each forward's are appended by concatenation (no 256-step
    buffer: a resumed forward has hundreds of rows). Records a base run's keys too."""

    def __init__(self, keys: mx.array | None = None, values: mx.array | None = None):
        super().__init__()
        self.keys, self.values = keys, values
        self.offset = 0 if keys is None else int(keys.shape[2])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset = int(self.keys.shape[2])
        return self.keys, self.values


def _first(out: Any) -> mx.array:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, h: mx.array) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextmanager
def wrapped_calls(model: Any, wrappers: dict[tuple[str, int], Callable]) -> Iterator[None]:
    """Inside, the module of each ``(kind, layer)`` runs ``wrapper(original_call, self, *args,
    **kwargs)`` instead of its call (class swaps, restored on exit)."""
    with ExitStack() as stack:
        for (kind, layer), wrapper in wrappers.items():
            module = module_of(model, layer, kind)
            original_call = type(module).__call__

            def call(self, *args, _w=wrapper, _o=original_call, **kwargs):
                return _w(_o, self, *args, **kwargs)

            stack.enter_context(swapped(module, "Patching", call))
        yield


@dataclass
class BaseRun:
    """One recorded forward of right-padded prompts ``tokens`` ``[n, T]``.

    ``resid``: the input of every layer and the final residual, ``L + 1`` arrays
    ``[n, T, d_model]``; ``sites``: ``(kind, layer)`` -> ``[n, T, d_model]`` (attn_out,
    mlp_out) or ``[n, T, n_heads, head_dim]`` (z); ``keys``/``values``: per layer
    ``[n, kv_heads, T, head_dim]`` (None when not kept); ``logits``: ``[n, vocab]`` at
    ``last``."""

    tokens: mx.array
    last: list[int]
    resid: list[mx.array]
    sites: dict[tuple[str, int], mx.array] = field(default_factory=dict)
    keys: list[mx.array] | None = None
    values: list[mx.array] | None = None
    logits: mx.array | None = None


def record_base(
    model: Any,
    tokens: mx.array,
    last: Sequence[int],
    kinds: Collection[str],
    keep_kv: bool,
    cache: list | None = None,
) -> BaseRun:
    """Run ``tokens`` ``[n, T]`` once, recording what patches of ``kinds`` start from (after
    a prefix already in ``cache``, if given: then positions count from its end)."""
    n_layers = n_layers_of(model)
    resid: list[Any] = [None] * (n_layers + 1)
    sites: dict[tuple[str, int], mx.array] = {}

    def layer_rec(i: int) -> Callable:
        def wrapper(original, self, x, *args, **kwargs):
            resid[i] = x
            out = original(self, x, *args, **kwargs)
            if i == n_layers - 1:
                resid[n_layers] = _first(out)
            return out

        return wrapper

    def out_rec(kind: str, i: int) -> Callable:
        def wrapper(original, self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            sites[(kind, i)] = _first(out)
            return out

        return wrapper

    def z_rec(i: int, n_heads: int) -> Callable:
        def wrapper(original, self, x, *args, **kwargs):
            sites[("z", i)] = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
            return original(self, x, *args, **kwargs)

        return wrapper

    wrappers: dict[tuple[str, int], Callable] = {}
    for i in range(n_layers):
        wrappers[("resid_pre", i)] = layer_rec(i)
        for kind in ("attn_out", "mlp_out"):
            if kind in kinds:
                wrappers[(kind, i)] = out_rec(kind, i)
        if "z" in kinds:
            wrappers[("z", i)] = z_rec(i, n_heads_of(model, i))
    if keep_kv and cache is not None:
        raise ValueError("a base run keeps its keys/values from position 0: no prefix cache")
    kept = [ConcatKV() for _ in range(n_layers)] if keep_kv else None
    caches = kept if kept is not None else cache
    with wrapped_calls(model, wrappers):
        logits = last_position_logits(model, tokens, last, caches)
    run = BaseRun(tokens, list(last), resid, sites, logits=logits)
    if kept is not None:  # the forward filled every layer's cache
        run.keys = [cast(mx.array, c.keys) for c in kept]
        run.values = [cast(mx.array, c.values) for c in kept]
    mx.eval(run.resid, list(run.sites.values()), run.logits, run.keys or [], run.values or [])
    return run


@dataclass
class RowEdits:
    """Per-row overwrites of module outputs inside the start layer of a resumed forward:
    ``kind`` -> (``mask`` bool ``[rows, n]`` (z: ``[rows, n, n_heads]``), ``values`` of the
    output's shape ``[rows, n, ...]``)."""

    edits: dict[str, tuple[mx.array, mx.array]] = field(default_factory=dict)


def _edit_wrapper(kind: str, mask: mx.array, values: mx.array, n_heads: int) -> Callable:
    if kind == "z":

        def z_wrapper(original, self, x, *args, **kwargs):
            heads = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
            heads = mx.where(mask[..., None], values.astype(x.dtype), heads)
            return original(self, heads.reshape(x.shape), *args, **kwargs)

        return z_wrapper

    def out_wrapper(original, self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        h = _first(out)
        return _replace_first(out, mx.where(mask[..., None], values.astype(h.dtype), h))

    return out_wrapper


def resumed_logits(
    model: Any,
    base: BaseRun,
    start: int,
    a: int,
    pair: mx.array,
    h: mx.array,
    last: Sequence[int],
    edits: RowEdits | None = None,
) -> mx.array:
    """Logits ``[rows, vocab]`` at absolute positions ``last`` of a forward resumed at layer
    ``start`` (``n_layers``: the final residual) over positions ``>= a``.

    ``pair`` ``[rows]``: the base-run row each row continues (its tokens, and its keys/values
    of positions ``< a``); ``h`` ``[rows, T - a, d_model]``: the input of layer ``start`` at
    positions ``>= a`` (the final residual when ``start == n_layers``); ``edits``: outputs
    overwritten inside layer ``start``."""
    n_layers = n_layers_of(model)
    caches = None
    if a > 0:
        if base.keys is None or base.values is None:
            raise ValueError("resuming after position 0 needs a base run that kept its keys/values")
        caches = [
            ConcatKV(k[pair, :, :a], v[pair, :, :a])
            for k, v in zip(base.keys, base.values, strict=True)
        ]
    tokens = base.tokens[pair, a:]

    def skip(original, self, x, *args, **kwargs):  # a layer below the start: h, not computed
        return h

    def begin(original, self, x, *args, **kwargs):  # the start layer reads h
        return original(self, h, *args, **kwargs)

    wrappers: dict[tuple[str, int], Callable] = {("resid_pre", i): skip for i in range(start)}
    if start == 0:
        wrappers[("resid_pre", 0)] = begin
    for kind, (mask, values) in (edits.edits if edits else {}).items():
        if start >= n_layers:
            raise ValueError(f"no layer {start} to edit {kind} in")
        n_heads = n_heads_of(model, start) if kind == "z" else 0
        wrappers[(kind, start)] = _edit_wrapper(kind, mask, values, n_heads)
    with wrapped_calls(model, wrappers):
        return last_position_logits(model, tokens, [j - a for j in last], caches)
