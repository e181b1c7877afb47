"""Steering settings as rows of one batched forward, on the unsteered states of the rest.

A row is one prompt under one steering setting. It continues a context of reused states (the
unsteered prefix and the prompt's own unsteered tokens before its first edited position, or
a prefix steered by its setting) and runs only the rest of its prompt, then greedy tokens.
Rows of different settings (main and random directions, alphas) share a forward: the edit
of each row comes from :class:`RowSteering`, one mode applied with per-row vectors
``[batch, 1, d]`` (``mlx_interp.interventions.modes``) through the one steering path
(:func:`~mlx_interp.interventions.steering.steer`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.classswap import swapped
from mlx_interp.interventions.modes import SteeringError, WrappingMode, make_mode
from mlx_interp.interventions.prefix import last_logits
from mlx_interp.interventions.rowcache import RowKV, keep_rows
from mlx_interp.models.anatomy import anatomy_of


class RowSteering(WrappingMode):
    """``inner`` with a setting per row: row b of the current batch uses setting ``rows[b]``
    (its vector and center at each edited layer, its alpha), at the positions the gate
    opens (``gate`` ``[batch, seq]`` for a multi-token forward; ``decode`` for one token).

    ``vectors``/``centers``: layer -> ``[settings, d_model]`` (centers may be None);
    ``alphas`` ``[settings]``. An ``every_layer`` inner mode needs one named layer."""

    def __init__(
        self,
        inner: Any,
        vectors: dict[int, np.ndarray],
        centers: dict[int, np.ndarray | None],
        alphas: Sequence[float],
    ):
        self.inner = inner = make_mode(inner)  # a SteeringMode: no probing
        self.vectors, self.centers = vectors, centers
        self.alphas = np.asarray(alphas, dtype=np.float64)
        if inner.every_layer and len(vectors) != 1:
            raise SteeringError("an every-layer mode batches settings of one named layer only")
        self.rows = np.zeros(0, np.int64)
        self.select_rows: list[int] = []  # the setting of each row of a group (batches slice it)
        self.gate: mx.array | None = None
        self.decode = True
        self._arrays: dict[tuple, tuple[mx.array, mx.array | None]] = {}

    @property
    def every_layer(self) -> bool:
        return self.inner.every_layer

    def select(self, rows: Sequence[int]) -> None:
        """The setting of each row of the next forwards."""
        self.rows = np.asarray(rows, dtype=np.int64)
        self._arrays.clear()

    def keep(self, kept: Sequence[int]) -> None:
        """Rows ``kept`` of the batch stay (the others finished)."""
        self.select(self.rows[np.asarray(kept, dtype=np.int64)].tolist())

    def arrays(self, layer: int, dtype: Any) -> tuple[mx.array, mx.array | None]:
        """(vectors, centers) ``[batch, 1, d]`` of the current rows at ``layer``."""
        key = (layer, dtype)
        if key not in self._arrays:
            v = self.vectors[layer][self.rows][:, None, :]
            c = self.centers.get(layer)
            self._arrays[key] = (
                mx.array(v).astype(dtype),
                None if c is None else mx.array(c[self.rows][:, None, :]).astype(dtype),
            )
        return self._arrays[key]

    def __call__(self, h: mx.array, vector: Any, center: Any, alpha: float) -> mx.array:
        """Unbound: the edit of the first named layer (``steer`` binds one per layer)."""
        return self.for_layer(next(iter(self.vectors)))(h, vector, center, alpha)

    def for_layer(self, layer: int) -> _BoundRows:
        named = next(iter(self.vectors)) if self.every_layer else layer
        return _BoundRows(self, named, self.inner.for_layer(layer))


class _BoundRows:
    """:class:`RowSteering` at one layer (``named``: whose vectors it applies)."""

    def __init__(self, parent: RowSteering, named: int, inner: Any):
        self.parent, self.named, self.inner = parent, named, inner
        self.needs_center = parent.needs_center

    def __call__(self, h: mx.array, vector: Any, center: Any, alpha: float) -> mx.array:
        parent = self.parent
        if h.shape[1] == 1 and parent.gate is None:
            if not parent.decode:
                return h
            gate = None
        else:
            gate = parent.gate
            if gate is not None and tuple(gate.shape) != tuple(h.shape[:2]):
                raise SteeringError(
                    f"row steering: a forward of shape {tuple(h.shape[:2])} has a gate of "
                    f"shape {tuple(gate.shape)}"
                )
        if len(parent.rows) != h.shape[0]:
            raise SteeringError(
                f"row steering has settings for {len(parent.rows)} rows but the forward has "
                f"{h.shape[0]}: select the rows' settings before each batch"
            )
        vectors, centers = parent.arrays(self.named, h.dtype)
        alphas = parent.alphas[parent.rows]
        values = np.unique(alphas)
        edited = self.inner(h, vectors, centers, float(values[0]))
        for value in values[1:]:
            pick = mx.array(alphas == value)[:, None, None]
            edited = mx.where(pick, self.inner(h, vectors, centers, float(value)), edited)
        if gate is None:
            return edited
        return mx.where(gate[..., None], edited, h)


@contextmanager
def start_at_layer(model: Any, layer: int, residual: mx.array) -> Iterator[None]:
    """Run forwards from decoder layer ``layer`` on: the layers before it compute nothing,
    and the one just before returns ``residual`` ``[batch, seq, d_model]`` (the residual
    entering ``layer``, e.g. an unsteered one computed earlier). Their caches stay as they
    are, so use it for a forward whose keys/values below ``layer`` are not needed again."""
    blocks = anatomy_of(model).layers
    with ExitStack() as stack:
        for index in range(layer):
            given = residual if index == layer - 1 else None

            def call(self, h, *args, _given=given, **kwargs):
                return h if _given is None else _given.astype(h.dtype)

            stack.enter_context(swapped(blocks[index], "Skipped", call))
        yield


@dataclass
class RowRun:
    """What a batch of rows computed: ``logits`` float32 ``[batch, vocab]`` at each row's
    last prompt token, and (generation) each row's greedy token ids."""

    logits: np.ndarray
    tokens: list[list[int]] | None = None


def _right_padded(runs: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    lengths = [len(r) for r in runs]
    width = max(lengths)
    return mx.array([list(r) + [pad_id] * (width - len(r)) for r in runs], dtype=mx.int32), lengths


def run_rows(
    model: Any,
    caches: list[RowKV],
    runs: Sequence[Sequence[int]],
    first_logits: mx.array | None = None,
    edits: RowSteering | None = None,
    gate: np.ndarray | None = None,
    max_tokens: int = 0,
    eos: set[int] | frozenset[int] = frozenset(),
    pad_id: int = 0,
    start: tuple[int, mx.array] | None = None,
) -> RowRun:
    """Run each row's ``runs[b]`` tokens (right-padded) on ``caches``, then ``max_tokens``
    greedy tokens per row (stopping a row at an id in ``eos``, not kept).

    ``first_logits`` ``[batch, vocab]``: rows with nothing to run (every run empty) start
    from these (their prompt's stored logits). ``edits``: the rows' steering (already in a
    ``steer`` context), with ``gate`` bool ``[batch, run width]`` for the run (None: every
    run position) and its ``decode`` flag for generated tokens. ``start = (layer,
    residual)``: the run starts at that layer (:func:`start_at_layer`; no generation)."""
    if start is not None and max_tokens:
        raise ValueError("a run that starts past layer 0 leaves no keys/values to generate on")
    if any(len(r) for r in runs):
        tokens, lengths = _right_padded(runs, pad_id)
        if edits is not None:
            edits.gate = None if gate is None else mx.array(gate)
        try:
            with start_at_layer(model, *start) if start is not None else nullcontext():
                logits = last_logits(model, tokens, [n - 1 for n in lengths], caches)
        finally:
            if edits is not None:
                edits.gate = None
        caches[0].context.advance(tokens.shape[1], lengths)
    else:
        if first_logits is None:
            raise ValueError("rows with nothing to run need their first logits")
        logits = first_logits
    logits = logits.astype(mx.float32)
    out = RowRun(np.array(logits))
    if max_tokens < 1:
        return out
    out.tokens = _greedy(model, caches, logits, max_tokens, eos, edits)
    return out


def queue_ahead() -> bool:
    """Whether greedy decoding queues the next step before reading this step's tokens: on a
    GPU (as mlx-lm's generate loop), where the wait for a token would idle the device. Not on
    the CPU, where a step is compute-bound and the queued step is waste for every row that has
    just ended: the default experiment's answers end after 2-3 tokens, so 1 forward in 3 was
    spent on finished rows (greedy answers of the baseline stage 6.9 s with the step queued,
    5.9 s without, SmolLM2 on 2 cores)."""
    return mx.default_device() == mx.gpu


def _greedy(model, caches, logits, max_tokens, eos, edits) -> list[list[int]]:
    """Greedy tokens of every row from ``logits``; a row stops at an EOS (not kept). On a GPU
    the next step is queued before this step's tokens are read (:func:`queue_ahead`).
    Finished rows leave the batch once they are half of it (dropping a row copies every
    layer's cache; until then they run on and their tokens are ignored)."""
    n = logits.shape[0]
    ids: list[list[int]] = [[] for _ in range(n)]
    active = list(range(n))  # batch row -> answer index
    done: set[int] = set()  # answer indices that ended
    early = queue_ahead()

    def step_from(token: mx.array) -> mx.array:
        nxt = mx.argmax(model(token[:, None], cache=caches)[:, -1], axis=-1)
        caches[0].context.advance(1)
        mx.async_eval(nxt)
        return nxt

    token = mx.argmax(logits, axis=-1)
    mx.async_eval(token)
    for step in range(max_tokens):
        more = step < max_tokens - 1
        ahead = step_from(token) if early and more else None
        for row, tok in enumerate(cast(list[int], token.tolist())):
            answer = active[row]
            if answer in done:
                continue
            if tok in eos:
                done.add(answer)
            else:
                ids[answer].append(tok)
        if not more or len(done) == n:
            break
        finished = sum(answer in done for answer in active)
        if finished and 2 * finished >= len(active):
            keep = [row for row, answer in enumerate(active) if answer not in done]
            keep_rows(caches, keep)
            if edits is not None:
                edits.keep(keep)
            rows = mx.array(keep, dtype=mx.int32)
            if ahead is not None:
                ahead = ahead[rows]
            else:
                token = token[rows]
            active = [active[row] for row in keep]
        token = ahead if ahead is not None else step_from(token)
    return ids
