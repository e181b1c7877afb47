"""Activation capture for mlx-lm models, without forward hooks.

MLX has no hooks, so :func:`capture_layers` puts an output hook on each selected decoder
layer through the class-swap core (:func:`~mlx_interp.interventions.classswap.hooked`: the
layer's ``__class__`` becomes a one-off subclass that records its output ``[batch, seq,
d_model]``). No module is replaced, so parameter names are unchanged, and the original
classes are restored on exit, also when the body raises.

Recording state lives on the dynamically created subclass (a closure), never on the layer
instance: ``mlx.nn.Module`` is a dict and would store arrays set as attributes as parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.classswap import (
    LayerIndexError,
    Recorder,
    StopForward,
    decoder_layers,
    hooked,
    resolve_layers,
)
from mlx_interp.interventions.prefix import expand_cache

__all__ = [
    "POSITIONS",
    "LayerIndexError",
    "LayerRecorder",
    "capture_batch",
    "capture_layers",
    "decoder_layers",
    "resolve_layers",
]

POSITIONS = ("last", "all", "mean")


class LayerRecorder(Recorder):
    """Outputs recorded by :func:`capture_layers`.

    Attributes:
        layers: the resolved (non-negative, sorted) layer indices being captured.
        outputs: layer index -> output of that layer in the latest forward,
            ``[batch, seq, d_model]`` (lazy ``mx.array``; keys are resolved indices).
        stop_after_last: whether the forward is cut short after ``layers[-1]``.
    """

    def __init__(self, layers: list[int], stop_after_last: bool) -> None:
        self.layers = layers
        self.stop_after_last = stop_after_last
        self.outputs: dict[int, mx.array] = {}


def _recording(recorder: LayerRecorder, index: int, stop_here: bool):
    """Output hook recording layer ``index`` into ``recorder`` (and stopping after it)."""

    def record(value: mx.array) -> mx.array:
        recorder.outputs[index] = value[...]  # its own view: in-place adds do not reach it
        if stop_here:
            raise StopForward
        return value

    return record


@contextmanager
def capture_layers(
    model: Any, layers: Sequence[int] | None = None, stop_after_last: bool = False
) -> Iterator[LayerRecorder]:
    """Record the outputs ``[batch, seq, d_model]`` of selected decoder layers.

    Usage::

        with capture_layers(model, [2, -1]) as rec:
            model(tokens)
        rec.outputs[2]  # [batch, seq, d_model]

    With ``stop_after_last=True`` an internal exception is raised right after the highest
    selected layer, skipping later layers, the final norm and the LM head. Wrap the forward in
    ``rec.run(model, tokens)`` to catch it; if it escapes the ``with`` body it is suppressed
    there (the rest of the body is then skipped).
    """
    blocks = decoder_layers(model)
    selected = resolve_layers(layers, len(blocks))
    recorder = LayerRecorder(selected, stop_after_last)
    with ExitStack() as stack:
        for index in selected:
            stop_here = stop_after_last and index == selected[-1]
            hook = _recording(recorder, index, stop_here)
            stack.enter_context(hooked(blocks[index], "output", hook, "Capturing"))
        try:
            yield recorder
        except StopForward:
            pass


def padded_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    """Right-pad ``sequences`` with ``pad_id``: tokens ``[batch, max_len]`` and lengths."""
    if not sequences:
        raise ValueError("a capture needs at least one sequence")
    lengths = [len(seq) for seq in sequences]
    if min(lengths) == 0:
        empty = lengths.index(0)
        raise ValueError(f"sequence {empty} is empty: every sequence needs at least one token")
    width = max(lengths)
    rows = [list(seq) + [pad_id] * (width - len(seq)) for seq in sequences]
    return mx.array(rows, dtype=mx.int32), lengths


def reduce_positions(hidden: mx.array, lengths: mx.array, positions: str) -> mx.array:
    """Reduce ``[batch, seq, ...]`` to float32 ``[batch, ...]`` ("last"/"mean"); "all" keeps
    it whole (split per sequence after conversion)."""
    hidden = hidden.astype(mx.float32)
    if positions == "last":
        return hidden[mx.arange(hidden.shape[0]), lengths - 1]
    if positions == "mean":
        real = mx.arange(hidden.shape[1])[None, :] < lengths[:, None]  # [batch, seq]
        trailing = (1,) * (hidden.ndim - 2)
        total = (hidden * real.reshape(*real.shape, *trailing).astype(mx.float32)).sum(axis=1)
        return total / lengths.reshape(-1, *trailing).astype(mx.float32)
    return hidden


def capture_batch(
    model: Any,
    sequences: list[list[int]],
    layers: Sequence[int] | None = None,
    positions: str = "last",
    pad_id: int = 0,
    prefix: tuple[int, list | None] | None = None,
    dtype: Any = np.float32,
) -> dict[int, np.ndarray | list[np.ndarray]]:
    """Capture activations for one right-padded batch of token sequences.

    Right padding with causal attention means real positions never attend to the pads, so no
    extra mask is needed. The forward stops after the highest selected layer.

    ``prefix``: ``(length, cache)`` of a prefix every sequence starts with, run earlier by
    :func:`~mlx_interp.interventions.prefix.shared_prefix` (same model state); with
    ``positions="last"`` only the suffixes are run, on copies of that KV cache (exact:
    causal attention). Ignored for the other positions, which need the prefix's own activations.

    Returns resolved layer index -> for ``positions="last"``: ``[batch, d_model]`` at each
    sequence's last real token; ``"mean"``: ``[batch, d_model]`` mean over real tokens (taken
    in float32); ``"all"``: list of ``[len_i, d_model]``, one per sequence; all in ``dtype``
    (numpy float32 or float16, converted inside MLX).
    """
    out_dtype = {np.dtype(np.float32): mx.float32, np.dtype(np.float16): mx.float16}.get(
        np.dtype(dtype)
    )
    if out_dtype is None:
        raise ValueError(f"capture dtype must be float32 or float16, not {np.dtype(dtype)}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; valid: {', '.join(POSITIONS)}")
    cache, skip = None, 0
    if prefix is not None and prefix[1] is not None and positions == "last":
        skip = prefix[0]
        if min(len(seq) for seq in sequences) <= skip:
            raise ValueError(f"every sequence must go on after the {skip}-token prefix")
        cache = expand_cache(prefix[1], len(sequences))
    tokens, lengths = padded_batch([list(seq[skip:]) for seq in sequences], pad_id)
    with capture_layers(model, layers, stop_after_last=True) as recorder:
        recorder.run(model, tokens, **({} if cache is None else {"cache": cache}))
    length_array = mx.array(lengths, dtype=mx.int32)
    lengths = [n + skip for n in lengths]
    reduced = {
        index: reduce_positions(recorder.outputs[index], length_array, positions).astype(out_dtype)
        for index in recorder.layers
    }
    mx.eval(*reduced.values())
    # the one-off recording classes form reference cycles that keep the recorder alive until
    # Python's cyclic GC runs: drop the full [batch, seq, d_model] outputs now
    recorder.outputs.clear()
    result: dict[int, np.ndarray | list[np.ndarray]] = {}
    for index, values in reduced.items():
        array = np.array(values)
        if positions == "all":
            result[index] = [array[row, :length].copy() for row, length in enumerate(lengths)]
        else:
            result[index] = array
    return result
