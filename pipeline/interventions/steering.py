"""Steering of the residual stream of mlx-lm models, without forward hooks.

MLX has no hooks, so :func:`steer` swaps ``layer.__class__`` of each chosen decoder layer for a
one-off subclass whose ``__call__`` runs the original ``__call__`` and edits its output
``[batch, seq, d_model]`` at every position (the first element when a layer returns a tuple).
The edit therefore applies in any forward: mlx-lm's own generate loop with its KV cache, or a
plain ``model(tokens)``. Original classes are restored on exit, also when the body raises.

Assigning ``__call__`` on the instance would do nothing (Python looks special methods up on
the type), and state set as attributes on a layer would become parameters (``nn.Module`` is a
dict), so the edit and its vectors live in the subclass's closure.

Modes (:mod:`mlx_interp.interventions.modes`, re-exported here) are small classes chosen by
name or by
Hydra ``_target_``; each maps ``(h [batch, seq, d_model], vector [d_model], center [d_model] |
None, alpha) -> h'`` and keeps the arithmetic in ``h``'s dtype. A mode with ``every_layer``
is applied after every decoder layer; a mode with ``for_layer`` is bound to each layer it
edits before any layer is touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mlx_interp.interventions.classswap import (
    VectorCache,
    check_alpha,
    decoder_layers,
    model_width,
    resolve_layers,
    subclass_with_call,
)
from mlx_interp.interventions.modes import (
    MODES,
    AblateAllLayersMode,
    AblateMode,
    AddMode,
    ConditionalMode,
    NormPreservingMode,
    ReflectMode,
    SteeringError,
    SubtractMode,
    make_mode,
)
from mlx_interp.interventions.prefix import batched_last_logits, greedy_generate

__all__ = [
    "MODES",
    "AblateAllLayersMode",
    "AblateMode",
    "AddMode",
    "ConditionalMode",
    "LayerEdit",
    "NormPreservingMode",
    "ReflectMode",
    "SteeringError",
    "SubtractMode",
    "generate_steered",
    "make_mode",
    "steer",
    "steered_last_logits",
]


@dataclass(frozen=True)
class LayerEdit:
    """One steering edit: ``vector`` (and ``center`` for reflect) applied at ``layer``.

    Attributes:
        layer: decoder layer index; negative counts from the last layer.
        vector: ``[d_model]`` raw direction, e.g. mean(pos) - mean(neg); need not be unit.
        center: ``[d_model]`` midpoint of the two class means, or None (reflect needs it).
    """

    layer: int
    vector: np.ndarray
    center: np.ndarray | None = None


def _check_array(name: str, value: Any, index: int, width: int | None) -> np.ndarray:
    """``value`` as a finite 1-D float array of length ``width`` (when known)."""
    array = np.asarray(value)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
        raise SteeringError(
            f"edit {index}: {name} must be a 1-D numeric array [d_model], got shape "
            f"{array.shape} and dtype {array.dtype}; pass one direction per LayerEdit"
        )
    if not np.all(np.isfinite(array)):
        raise SteeringError(
            f"edit {index}: {name} contains NaN or inf; recompute it from finite activations "
            "(a NaN often means an empty class when taking a mean)"
        )
    if width is not None and array.shape[0] != width:
        raise SteeringError(
            f"edit {index}: {name} has {array.shape[0]} entries but the hidden size (d_model) "
            f"is {width}; use a direction computed on this model's activations"
        )
    return array.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Prepared:
    """A validated edit: resolved layer index and float32 arrays."""

    layer: int
    vector: np.ndarray
    center: np.ndarray | None


def _prepare(model: Any, edits: Sequence[LayerEdit], mode: Any) -> list[_Prepared]:
    """Validate ``edits`` against ``model`` and ``mode``; resolve layer indices."""
    n_layers = len(decoder_layers(model))
    width = model_width(model)
    prepared = []
    for index, edit in enumerate(edits):
        if not isinstance(edit, LayerEdit):
            raise SteeringError(f"edit {index} is a {type(edit).__name__}, not a LayerEdit")
        (layer,) = resolve_layers([edit.layer], n_layers)
        vector = _check_array("vector", edit.vector, index, width)
        width = len(vector)  # without model args, the first vector sets it for the rest
        if not np.linalg.norm(vector.astype(np.float64)) > 0:
            raise SteeringError(
                f"edit {index}: the steering vector at layer {edit.layer} is all zeros, so it "
                "has no direction; check that the two classes differ or drop this edit"
            )
        center = None
        if edit.center is not None:
            center = _check_array("center", edit.center, index, len(vector))
        elif getattr(mode, "needs_center", False):
            raise SteeringError(
                f"edit {index}: {type(mode).__name__} needs a center (the midpoint of the two "
                "class means); pass LayerEdit(..., center=...)"
            )
        prepared.append(_Prepared(layer, vector, center))
    return prepared


def _steering_class(original: type, edits: list[_Prepared], mode: Any, alpha: float) -> type:
    """Build a subclass of ``original`` whose ``__call__`` edits the layer output."""
    original_call = original.__call__
    width = edits[0].vector.shape[0]  # all edits share it (checked in _prepare)
    arrays_for = VectorCache([(edit.vector, edit.center) for edit in edits])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = original_call(self, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[-1] != width:
            raise SteeringError(
                f"layer {edits[0].layer} outputs d_model={h.shape[-1]} but the steering vector "
                f"has {width} entries; use a direction computed on this model's activations"
            )
        for vector, center in arrays_for(h.dtype):
            h = mode(h, vector, center, alpha)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return subclass_with_call(original, "Steering", __call__)


@contextmanager
def steer(model: Any, edits: Sequence[LayerEdit], mode: Any, alpha: float) -> Iterator[None]:
    """Edit the residual stream at the layers named by ``edits`` in every forward inside.

    ``mode`` is a name from :data:`MODES`, a ``_target_`` config or a mode object. Several
    edits on one layer apply in order; an ``every_layer`` mode applies each edit after every
    decoder layer. Empty ``edits`` makes this a no-op. Raises
    :class:`SteeringError` (non-finite alpha, zero/non-finite vector, wrong d_model, missing
    center) or :class:`~mlx_interp.interventions.capture.LayerIndexError` (layer out of
    range) before any layer is touched.
    """
    if not edits:
        yield
        return
    mode = make_mode(mode)
    alpha = check_alpha(alpha, SteeringError)
    prepared = _prepare(model, edits, mode)
    blocks = decoder_layers(model)
    if getattr(mode, "every_layer", False):
        prepared = [replace(e, layer=i) for i in range(len(blocks)) for e in prepared]
    grouped: dict[int, list[_Prepared]] = {}
    for edit in prepared:
        grouped.setdefault(edit.layer, []).append(edit)
    bind = getattr(mode, "for_layer", None)
    modes = {index: bind(index) if bind else mode for index in grouped}  # may raise: not swapped
    swapped: list[tuple[Any, type]] = []
    try:
        for index, layer_edits in sorted(grouped.items()):
            layer = blocks[index]
            original = type(layer)
            layer.__class__ = _steering_class(original, layer_edits, modes[index], alpha)
            swapped.append((layer, original))
        yield
    finally:
        for layer, original in reversed(swapped):
            layer.__class__ = original


def generate_steered(
    model: Any,
    tokenizer: Any,
    prompt_tokens: list[int],
    edits: Sequence[LayerEdit],
    mode: Any,
    alpha: float,
    max_tokens: int = 32,
) -> tuple[str, list[int]]:
    """Greedy generation under :func:`steer` with mlx-lm's own loop and default KV cache.

    Runs ``mlx_lm.generate.generate_step`` (argmax sampler) and stops at an EOS token (not
    included) or after ``max_tokens``. Returns the decoded text and the generated token ids.
    """
    if not prompt_tokens:
        raise ValueError("generate_steered needs at least one prompt token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    with steer(model, edits, mode, alpha):
        return greedy_generate(model, tokenizer, [prompt_tokens], max_tokens, prefix=False)[0]


def steered_last_logits(
    model: Any,
    sequences: list[list[int]],
    edits: Sequence[LayerEdit],
    mode: Any,
    alpha: float,
    pad_id: int = 0,
) -> np.ndarray:
    """One right-padded batched forward under :func:`steer`.

    Returns float32 ``[batch, vocab]`` logits at each sequence's own last real token. Right
    padding with causal attention means real positions never see the pads.
    """
    if not sequences:
        raise ValueError("steered_last_logits needs at least one sequence")
    lengths = [len(seq) for seq in sequences]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty: every sequence needs a token")
    with steer(model, edits, mode, alpha):
        return batched_last_logits(model, sequences, pad_id, len(sequences), prefix=False)
