"""Where a steering edit acts: token positions by role, and a gate that confines a mode to them.

Position rules (``steer.positions``):

- ``all``: every token, the shared prefix (system prompt, few-shot turns) included;
- ``suffix``: every token after the prompts' shared prefix, and every generated token;
- ``last``: the last prompt token and every generated token;
- ``object``: the object's own tokens (``object_span``), no generated token.

``object`` and ``last`` differ from row to row, so the scorers run them batch by batch and
set a per-row mask ``[batch, seq]`` on a :class:`PositionGate` before each prompt forward;
decode steps (one new token per row) get ``generated``. :class:`GatedMode` applies its inner
mode only where the gate is open and leaves every other position exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.engine.schema import STEER_POSITIONS
from mlx_interp.interventions.modes import SteeringError, WrappingMode, make_mode

POSITIONS = STEER_POSITIONS  # all | suffix | last | object (one list, in the schema)
PER_ROW = ("last", "object")  # rules whose mask differs between rows


class PositionError(SteeringError):
    """A position rule that cannot be placed (unknown name, object not in the prompt)."""


def object_span(tokenizer: Any, tokens: Sequence[int], obj: str) -> tuple[int, int]:
    """``[start, end)`` token indices of the last occurrence of ``obj`` in the prompt.

    The match is case-insensitive on the decoded text; the span is every token that overlaps
    the object's characters. The last occurrence is used because the question comes after
    the few-shot turns. Raises :class:`PositionError` when the object is not in the prompt.
    """
    tokens = [int(t) for t in tokens]
    text = tokenizer.decode(tokens)
    at = text.lower().rfind(obj.lower().strip()) if obj and obj.strip() else -1
    if at < 0:
        raise PositionError(
            f"object {obj!r} does not occur in the prompt {text[-80:]!r}; the dataset's "
            "`object` must be a word or phrase of the question text (fix the row)"
        )
    stop = at + len(obj.strip())
    end = len(tokens)
    while end > 0 and len(tokenizer.decode(tokens[: end - 1])) >= stop:
        end -= 1
    start = end - 1
    while start > 0 and len(tokenizer.decode(tokens[:start])) > at:
        start -= 1
    return start, end


def position_mask(
    rule: str,
    lengths: Sequence[int],
    offset: int,
    spans: Sequence[tuple[int, int]] | None,
    prefix: int = 0,
) -> np.ndarray:
    """bool ``[batch, max(lengths) - offset]``: which prompt positions ``rule`` edits.

    Column ``j`` is absolute token ``offset + j`` (``offset`` = tokens already in the KV
    cache); ``lengths`` are full prompt lengths; ``spans`` the object spans (``object``);
    ``prefix`` the shared prefix's length (``suffix``, on models whose prefix cannot be
    cached and run apart: it is masked instead)."""
    if rule not in (*PER_ROW, "suffix"):
        raise PositionError(f"position_mask is for the rules {PER_ROW} and suffix, not {rule!r}")
    width = max(lengths) - offset
    absolute = offset + np.arange(width)[None, :]  # [1, width]
    if rule == "suffix":
        return np.broadcast_to(absolute >= prefix, (len(lengths), width)).copy()
    if rule == "last":
        return absolute == (np.asarray(lengths)[:, None] - 1)
    if spans is None or len(spans) != len(lengths):
        raise PositionError("positions=object needs one object span per prompt")
    start = np.asarray([s for s, _ in spans])[:, None]
    end = np.asarray([e for _, e in spans])[:, None]
    if (start < offset).any():
        raise PositionError(
            f"an object span starts at token {int(start.min())}, inside the {offset}-token "
            "prefix shared by every prompt; the object must be in the question"
        )
    return (absolute >= start) & (absolute < end)


class PositionGate:
    """Mutable state the scorers set per batch: ``mask`` [batch, seq] for the prompt forward
    (None: no per-row mask) and ``generated`` for decode steps (one token per row)."""

    def __init__(self, generated: bool):
        self.mask: mx.array | None = None
        self.generated = bool(generated)

    def set(self, mask: np.ndarray | None) -> None:
        self.mask = None if mask is None else mx.array(mask)


class GatedMode(WrappingMode):
    """``inner``'s edit where the gate is open, ``h`` unchanged elsewhere."""

    def __init__(self, inner: Any, gate: PositionGate):
        self.inner, self.gate = make_mode(inner), gate  # a SteeringMode: no probing

    @property
    def every_layer(self) -> bool:
        """The inner mode's: an every-layer edit stays one under the gate."""
        return self.inner.every_layer

    def for_layer(self, layer: int) -> GatedMode:
        """The inner mode bound to ``layer`` (a conditional mode's probe), same gate."""
        return GatedMode(self.inner.for_layer(layer), self.gate)

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        mask = self.gate.mask
        if mask is not None and tuple(h.shape[:2]) == tuple(mask.shape):
            return mx.where(mask[..., None], self.inner(h, vector, center, alpha), h)
        if h.shape[1] != 1:
            raise PositionError(
                f"a forward of shape {tuple(h.shape[:2])} has no position mask (set for "
                f"{None if mask is None else tuple(mask.shape)}); per-row positions need the "
                "batched scorers of mlx_interp.analysis.scoring"
            )
        return self.inner(h, vector, center, alpha) if self.gate.generated else h


def object_spans(
    tokenizer: Any,
    tokens: Sequence[Sequence[int]],
    metas: Sequence[str],
    ids: Sequence[str] | None = None,
):
    """``[start, end)`` of each prompt's object (the ``object`` key of its JSON ``meta``);
    ``ids`` (the prompts' ids) name a prompt without one."""
    import json

    spans = []
    for i, (seq, meta) in enumerate(zip(tokens, metas, strict=True)):
        obj = json.loads(meta).get("object") if meta else None
        if not isinstance(obj, str) or not obj.strip():
            which = f"prompt {ids[i]!r}" if ids is not None else f"prompt number {i}"
            raise PositionError(
                f"{which} has no `object` in its dataset row; positions and directions at the "
                "object (steer.positions=object, directions.site=object, the localize stages) "
                "need every row of the dataset to name its object (key `object`); or use "
                "steer.positions=all and directions.site=last"
            )
        spans.append(object_span(tokenizer, seq, obj))
    return spans


ROLES = ("object", "after", "last")  # position roles of localization (lens, patching)


def role_positions(span: tuple[int, int], length: int) -> dict[str, list[int]]:
    """Token indices of each role in a prompt of ``length`` tokens whose object is ``span``:
    ``object`` its tokens, ``after`` the tokens after it up to the last, ``last`` the last."""
    start, end = span
    if not 0 <= start < end <= length - 1:
        raise PositionError(
            f"object span {span} must end before the last token of a {length}-token prompt"
        )
    return {
        "object": list(range(start, end)),
        "after": list(range(end, length - 1)),
        "last": [length - 1],
    }


class FromPosition(WrappingMode):
    """``inner``'s edit at absolute token positions ``>= start``, for streaming generation
    (the prompt, possibly in chunks, then one token per step): each forward's positions are
    counted. ``start = prompt length - 1`` is the ``last`` rule (the last prompt token and
    every generated token). ``steer`` binds one copy per edited layer (``for_layer``), so
    every layer counts its own forwards; one edit per layer."""

    def __init__(self, inner: Any, start: int):
        self.inner, self.start, self.seen = make_mode(inner), int(start), 0

    def for_layer(self, layer: int) -> FromPosition:
        return FromPosition(self.inner.for_layer(layer), self.start)

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        first, n = self.seen, h.shape[1]
        self.seen += n
        if first + n <= self.start:
            return h
        edited = self.inner(h, vector, center, alpha)
        if first >= self.start:
            return edited
        open_ = (mx.arange(first, first + n) >= self.start)[None, :, None]
        return mx.where(open_, edited, h)
