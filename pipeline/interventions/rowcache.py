"""A batch KV cache whose rows start from reused keys/values of different lengths.

Each row of a batched forward continues its own context: a shared prefix's keys/values and
the row's own (reused, e.g. unsteered) ones, of a different length per row, then what the
batch itself computes. mlx-lm's ``BatchKVCache`` expects left padding; here every cached
column instead records the token position it holds (-1: an empty or padded column), and the
attention mask is built from those positions: a query at position ``q`` sees the keys at
positions ``0 <= k <= q`` (and ``q - k < window`` for a sliding-window layer, the window the
model asks the mask for). Holes between a row's reused columns and its new ones are then
masked like pads, rows need no rolling, and each query gets its own rotary position.

Gemma 3's sliding-window layers use mlx-lm's ``RotatingKVCache``, which drops keys older than
the window; here every key is kept and the mask hides them, which is the same attention when
the model builds its sliding mask with ``window_size`` (gemma3_text does).
:func:`cache_refusal` says when these caches cannot stand in for a model's own.

One :class:`RowContext` is shared by the per-layer :class:`RowKV` caches of one batch; call
:meth:`RowContext.advance` after each forward with the number of real tokens per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache, make_prompt_cache


def cache_refusal(model: Any, longest: int) -> str | None:
    """Why :class:`RowKV` caches cannot replace ``model``'s own for sequences of up to
    ``longest`` tokens (None: they can). Plain ``KVCache`` layers always can; a
    ``RotatingKVCache`` layer (sliding window) can while no sequence outgrows its window
    (then nothing is ever dropped or masked by the window); other caches (recurrent, chunked,
    quantized) cannot."""
    for index, cache in enumerate(make_prompt_cache(model)):
        kind = type(cache).__name__
        if type(cache) is KVCache:
            continue
        if type(cache) is RotatingKVCache and getattr(cache, "keep", 0) == 0:
            window = int(cache.max_size)
            if longest <= window:
                continue
            return (
                f"layer {index} has a {window}-token sliding window (RotatingKVCache) and a "
                f"sequence reaches {longest} tokens"
            )
        return f"layer {index}'s cache is a {kind}, not a (sliding-window) KV cache"
    return None


class RowContext:
    """Positions of the cached columns of a batch of rows, shared by every layer's cache.

    ``positions`` int32 ``[batch, columns]``: the token position each filled column holds,
    -1 for an empty one; ``next_pos`` ``[batch]``: the position of each row's next token
    (the rotary offset of the next forward)."""

    def __init__(self, positions: np.ndarray, filled: int, next_pos: Sequence[int]):
        self.positions = mx.array(np.asarray(positions, dtype=np.int32))
        self.filled = int(filled)
        self.next_pos = mx.array(np.asarray(next_pos, dtype=np.int32))

    @property
    def batch(self) -> int:
        return int(self.next_pos.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.positions.shape[1])

    def mask(self, n: int, window: int | None = None) -> mx.array:
        """bool ``[batch, 1, n, filled + n]``: which keys each of the next ``n`` queries sees."""
        query = self.next_pos[:, None] + mx.arange(n, dtype=mx.int32)[None, :]  # [B, n]
        keys = mx.concatenate([self.positions[:, : self.filled], query], axis=1)
        q, k = query[:, :, None], keys[:, None, :]
        seen = (k >= 0) & (k <= q)
        if window is not None:
            seen = seen & (q - k < window)
        return seen[:, None]

    def advance(self, n: int, lengths: Sequence[int] | mx.array | None = None) -> None:
        """Record a forward of ``n`` columns, of which the first ``lengths[b]`` are row b's
        real tokens (None: all ``n``); the rest are padding, never seen again."""
        if lengths is None:
            lengths = mx.full((self.batch,), n, mx.int32)
        else:  # as given: an mx or numpy array, or a list of ints
            lengths = mx.array(
                lengths if isinstance(lengths, mx.array | np.ndarray) else list(lengths)
            )
        j = mx.arange(n, dtype=mx.int32)[None, :]
        new = mx.where(j < lengths[:, None], self.next_pos[:, None] + j, -1)
        if self.filled + n > self.capacity:
            grow = self.filled + n - self.capacity
            self.positions = mx.concatenate(
                [self.positions, mx.full((self.batch, grow), -1, mx.int32)], axis=1
            )
        self.positions[:, self.filled : self.filled + n] = new
        self.filled += n
        self.next_pos = self.next_pos + lengths.astype(mx.int32)

    def keep(self, rows: mx.array) -> None:
        """Keep only ``rows`` (int indices) of the batch."""
        self.positions = self.positions[rows]
        self.next_pos = self.next_pos[rows]


class RowKV(_BaseCache):
    """One layer's keys/values ``[batch, kv_heads, columns, head_dim]`` for a
    :class:`RowContext`; the first ``context.filled`` columns hold the reused ones. With
    ``keys=None`` the arrays are made at the first forward (shapes from its keys), with
    ``context.capacity`` columns."""

    def __init__(self, context: RowContext, keys: mx.array | None, values: mx.array | None):
        self.context, self.keys, self.values = context, keys, values

    @property
    def offset(self) -> mx.array:
        return self.context.next_pos

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        start, n = self.context.filled, keys.shape[2]
        k, v = self.keys, self.values
        if k is None or v is None:
            columns = max(self.context.capacity, start + n)
            k = mx.zeros((*keys.shape[:2], columns, keys.shape[3]), keys.dtype)
            v = mx.zeros((*values.shape[:2], columns, values.shape[3]), values.dtype)
        if start + n > k.shape[2]:
            grow = start + n - k.shape[2]
            pad_k = mx.zeros((*k.shape[:2], grow, k.shape[3]), k.dtype)
            pad_v = mx.zeros((*v.shape[:2], grow, v.shape[3]), v.dtype)
            k = mx.concatenate([k, pad_k], axis=2)
            v = mx.concatenate([v, pad_v], axis=2)
        k[..., start : start + n, :] = keys
        v[..., start : start + n, :] = values
        self.keys, self.values = k, v
        return k[..., : start + n, :], v[..., : start + n, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return self.context.mask(n, window_size)

    def keep(self, rows: mx.array) -> None:
        if self.keys is not None and self.values is not None:  # else nothing stored yet
            self.keys, self.values = self.keys[rows], self.values[rows]

    def empty(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values

    def is_trimmable(self) -> bool:
        return False


def keep_rows(caches: list[RowKV], rows: Sequence[int]) -> None:
    """Keep only ``rows`` of a batch in every layer's cache and their shared context."""
    index = mx.array(list(rows), dtype=mx.int32)
    caches[0].context.keep(index)
    for cache in caches:
        cache.keep(index)


def row_caches(
    layers: list[tuple[mx.array, mx.array]], positions: np.ndarray, filled: int, next_pos
) -> list[RowKV]:
    """Per-layer :class:`RowKV` over ``layers`` (keys, values ``[batch, kv_heads, columns,
    head_dim]``, the first ``filled`` columns reused) sharing one :class:`RowContext`."""
    context = RowContext(positions, filled, next_pos)
    return [RowKV(context, k, v) for k, v in layers]


def fresh_caches(n_layers: int, batch: int, columns: int) -> list[RowKV]:
    """Per-layer :class:`RowKV` with nothing reused: every row starts at position 0, with
    room for ``columns`` tokens (arrays made at the first forward)."""
    context = RowContext(np.full((batch, columns), -1, np.int32), 0, [0] * batch)
    return [RowKV(context, None, None) for _ in range(n_layers)]


def filled_kv(cache: RowKV) -> tuple[mx.array, mx.array]:
    """(keys, values) of a cache that a forward has filled."""
    assert cache.keys is not None and cache.values is not None, "a forward fills the cache"
    return cache.keys, cache.values
