"""Which token positions an edit touches, in every forward (prompt, cached steps, padding).

Positions are token indices of each row's prompt: ``"all"`` (or None: every position of
every forward, generated tokens included), ``"last"`` (each row's last prompt token), an
int or a list of ints (negative ones count from each row's end: -1 is its last token), or
one list per row (``[[3, 5], [2]]``). A :class:`PositionClock` installed on the model's
body reads each forward's KV-cache offset, so an index means the same token in a whole
prompt forward, a prefix-cached suffix and a decode step (a decode step is edited only if
its token is one of the positions). Each row's prompt length is what :func:`row_lengths`
declares (``run_with_cache`` does for its right-padded batch, ``Model.generate`` for its
prompt), else the width of the forward that starts at position 0: mlx-lm's own
``generate_step`` runs all but the last prompt token first, so around it declare the
prompt's length (``with row_lengths([len(prompt)])``) or give absolute indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.site_names import SiteError

_DECLARED: list[np.ndarray] = []  # stack of row lengths declared by row_lengths()


class PositionError(SiteError):
    """Positions that do not parse or fall outside a row's tokens."""


@contextmanager
def row_lengths(lengths: Sequence[int]) -> Iterator[None]:
    """Declare the real length of each row of the right-padded batches run inside (so -1
    means each row's own last token, not the last padded column)."""
    _DECLARED.append(np.asarray(list(lengths), dtype=np.int64))
    try:
        yield
    finally:
        _DECLARED.pop()


class Positions:
    """A parsed position spec (see the module docstring); ``every`` when it is all."""

    def __init__(self, spec: Any = None) -> None:
        self.spec = spec
        self.every = spec is None or (isinstance(spec, str) and spec == "all")
        self.rows: list[list[int]] | None = None  # per-row lists
        self.shared: list[int] | None = None  # one list for every row
        if self.every:
            return
        if isinstance(spec, str):
            if spec != "last":
                raise PositionError(
                    f"unknown positions {spec!r}: use 'all', 'last', an int, a list of ints "
                    "(negative counts from each row's end) or one list per row"
                )
            self.shared = [-1]
        elif _is_int(spec):
            self.shared = [int(spec)]
        elif isinstance(spec, Sequence) and spec and all(_is_int(p) for p in spec):
            self.shared = [int(p) for p in spec]
        elif isinstance(spec, Sequence) and spec and all(_is_int_list(r) for r in spec):
            self.rows = [[int(p) for p in row] for row in spec]
        else:
            raise PositionError(
                f"positions must be 'all', 'last', an int, a non-empty list of ints or one "
                f"list of ints per row, not {spec!r}"
            )

    def __repr__(self) -> str:
        return f"Positions({self.spec!r})"

    def resolved(self, lengths: np.ndarray) -> list[list[int]]:
        """Non-negative prompt positions of each row (``lengths`` [batch])."""
        if self.rows is not None and len(self.rows) != len(lengths):
            raise PositionError(
                f"{len(self.rows)} per-row position lists for a batch of {len(lengths)} rows"
            )
        out = []
        for row, length in enumerate(lengths):
            wanted = self.rows[row] if self.rows is not None else self.shared
            picked = []
            for p in wanted or []:
                q = p + int(length) if p < 0 else p
                if not 0 <= q < length:
                    raise PositionError(
                        f"position {p} is outside row {row}'s {int(length)} tokens "
                        f"(valid: {-int(length)}..{int(length) - 1})"
                    )
                picked.append(q)
            out.append(picked)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(map(_is_int, value))


class PositionClock:
    """Absolute positions of the tokens of the current forward, per row, from the KV cache
    the body (or the first layer) is called with; installed as an ``enter`` hook."""

    def __init__(self, cache_arg: int) -> None:
        self.cache_arg = cache_arg  # where the cache sits among the positional arguments
        self.offsets: np.ndarray | None = None  # [batch]: position of each row's first token
        self.lengths: np.ndarray | None = None  # [batch]: each row's prompt length

    def __call__(self, args: tuple, kwargs: dict) -> None:
        tokens = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
        if tokens is None:
            return  # a call without its input: not a forward to place
        cache = kwargs.get("cache", args[self.cache_arg] if len(args) > self.cache_arg else None)
        if isinstance(cache, (list, tuple)):
            cache = cache[0] if cache else None
        batch, width = int(tokens.shape[0]), int(tokens.shape[1])
        offset = 0 if cache is None else cache.offset
        offsets = np.broadcast_to(np.array(offset, dtype=np.int64), (batch,)).copy()
        self.offsets = offsets
        if not offsets.any():  # a new prompt
            declared = _DECLARED[-1] if _DECLARED else None
            fits = declared is not None and len(declared) == batch
            self.lengths = declared if fits else np.full(batch, width, dtype=np.int64)
        elif self.lengths is None or len(self.lengths) != batch:
            self.lengths = offsets + width  # joined mid-sequence: the tokens so far

    def mask(self, positions: Positions, batch: int, width: int) -> np.ndarray:
        """bool ``[batch, width]``: which columns of this forward are among ``positions``."""
        if self.offsets is None or self.lengths is None or len(self.offsets) != batch:
            raise PositionError(
                "an edit at chosen positions ran in a forward the position clock did not see; "
                "call the model itself (model(tokens) or generation), not one of its layers"
            )
        absolute = self.offsets[:, None] + np.arange(width)[None, :]
        mask = np.zeros((batch, width), dtype=bool)
        for row, picked in enumerate(positions.resolved(self.lengths)):
            mask[row] = np.isin(absolute[row], picked)
        return mask


def where_positions(
    fn: Any, positions: Positions, clock: PositionClock | None, seq_axis: int
) -> Any:
    """``fn`` applied only at ``positions`` (the value's ``seq_axis`` indexes tokens);
    elsewhere the value passes unchanged. ``fn`` itself when positions are all."""
    if positions.every:
        return fn

    if clock is None:
        raise PositionError("edits at chosen positions need a position clock on the model")

    def at_positions(value: mx.array) -> mx.array:
        batch, width = value.shape[0], value.shape[seq_axis]
        mask = clock.mask(positions, batch, width)
        if not mask.any():
            return value
        shape = [1] * value.ndim
        shape[0], shape[seq_axis] = batch, width
        edited = fn(value)
        return mx.where(mx.array(mask).reshape(shape), edited.astype(value.dtype), value)

    return at_positions
