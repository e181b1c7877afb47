"""Steering of the residual stream of mlx-lm models, without forward hooks.

MLX has no hooks, so :func:`steer` swaps ``layer.__class__`` of each chosen decoder layer for a
one-off subclass whose ``__call__`` runs the original ``__call__`` and edits its output
``[batch, seq, d_model]`` at every position (the first element when a layer returns a tuple).
The edit therefore applies in any forward: mlx-lm's own generate loop with its KV cache, or a
plain ``model(tokens)``. Original classes are restored on exit, also when the body raises.

Assigning ``__call__`` on the instance would do nothing (Python looks special methods up on
the type), and state set as attributes on a layer would become parameters (``nn.Module`` is a
dict), so the edit and its vectors live in the subclass's closure.

Modes are small classes chosen by name or by Hydra ``_target_``; each maps
``(h [batch, seq, d_model], vector [d_model], center [d_model] | None, alpha) -> h'`` and keeps
the arithmetic in ``h``'s dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from pipeline.capture import decoder_layers, resolve_layers, subclass_with_call
from pipeline.prefix import batched_last_logits, greedy_generate

__all__ = [
    "MODES",
    "AblateMode",
    "AddMode",
    "LayerEdit",
    "ReflectMode",
    "SteeringError",
    "SubtractMode",
    "generate_steered",
    "make_mode",
    "steer",
    "steered_last_logits",
]


class SteeringError(ValueError):
    """A steering request that cannot be applied (bad vector, alpha, width or mode)."""


def _unit(vector: mx.array) -> mx.array:
    """``vector / |vector|`` in the vector's dtype."""
    return vector / mx.linalg.norm(vector)


class AddMode:
    """``h + alpha * vector``: push every position along the direction."""

    needs_center: ClassVar[bool] = False

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        return h + alpha * vector


class SubtractMode:
    """``h - alpha * vector``: push every position against the direction."""

    needs_center: ClassVar[bool] = False

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        return h - alpha * vector


class ReflectMode:
    """Mirror across the hyperplane through ``center`` orthogonal to ``vector``.

    With ``u = vector / |vector|`` and ``c = (h - center) . u``: ``h' = h - 2 * alpha * c * u``.
    ``alpha = 1`` is the exact mirror (the positive class mean lands on the negative one when
    ``center`` is their midpoint and ``vector`` their difference); ``alpha`` scales the move.
    """

    needs_center: ClassVar[bool] = True

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        if center is None:
            raise ValueError(
                "reflect mode needs a center (the midpoint of the two class means); "
                "pass LayerEdit(..., center=...)"
            )
        u = _unit(vector)
        coefficient = (2 * alpha) * ((h - center) @ u)  # [batch, seq]
        return h - coefficient[..., None] * u


class AblateMode:
    """``h - alpha * (h . u) u`` with ``u = vector / |vector|``; ``alpha = 1`` projects it out."""

    needs_center: ClassVar[bool] = False

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        u = _unit(vector)
        coefficient = alpha * (h @ u)  # [batch, seq]
        return h - coefficient[..., None] * u


MODES: dict[str, type] = {
    "add": AddMode,
    "subtract": SubtractMode,
    "reflect": ReflectMode,
    "ablate": AblateMode,
}


def make_mode(name_or_cfg: Any) -> Any:
    """A mode from a name in :data:`MODES`, a config with ``_target_``, a mode class or object."""
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in MODES:
            raise SteeringError(
                f"unknown steering mode {name_or_cfg!r}; valid modes: {', '.join(MODES)}"
            )
        return MODES[name_or_cfg]()
    if isinstance(name_or_cfg, Mapping):
        if "_target_" not in name_or_cfg:
            raise SteeringError(
                "a steering mode config needs a `_target_` (e.g. pipeline.steering.AddMode); "
                f"or use a name: {', '.join(MODES)}"
            )
        from hydra.utils import instantiate

        try:
            return instantiate(name_or_cfg)
        except Exception as err:
            raise SteeringError(
                f"cannot build the steering mode {dict(name_or_cfg)}: {err}; valid modes: "
                f"{', '.join(MODES)}"
            ) from err
    if isinstance(name_or_cfg, type):
        return name_or_cfg()
    if callable(name_or_cfg):
        return name_or_cfg
    raise SteeringError(
        f"a steering mode must be a name ({', '.join(MODES)}), a config with `_target_`, "
        f"or a callable mode object; got {type(name_or_cfg).__name__}"
    )


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


def _model_width(model: Any) -> int | None:
    """``d_model`` declared by the model's args, if any (``hidden_size``, ``n_embd``...)."""
    args = getattr(model, "args", None)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _check_alpha(alpha: float) -> float:
    """``alpha`` as a finite Python float."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise SteeringError(f"alpha must be a real number, got {alpha!r}")
    if not np.isfinite(alpha):
        raise SteeringError(
            f"alpha is {alpha}; steering needs a finite alpha (e.g. 0.5..4; 0 disables the edit)"
        )
    return float(alpha)


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
    width = _model_width(model)
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
    by_dtype: dict[Any, list[tuple[mx.array, mx.array | None]]] = {}

    def arrays_for(dtype: Any) -> list[tuple[mx.array, mx.array | None]]:
        if dtype not in by_dtype:
            by_dtype[dtype] = [
                (
                    mx.array(edit.vector).astype(dtype),
                    None if edit.center is None else mx.array(edit.center).astype(dtype),
                )
                for edit in edits
            ]
        return by_dtype[dtype]

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
    edits on one layer apply in order. Empty ``edits`` makes this a no-op. Raises
    :class:`SteeringError` (non-finite alpha, zero/non-finite vector, wrong d_model, missing
    center) or :class:`~pipeline.capture.LayerIndexError` (layer out of range) before any
    layer is touched.
    """
    if not edits:
        yield
        return
    mode = make_mode(mode)
    alpha = _check_alpha(alpha)
    prepared = _prepare(model, edits, mode)
    blocks = decoder_layers(model)
    grouped: dict[int, list[_Prepared]] = {}
    for edit in prepared:
        grouped.setdefault(edit.layer, []).append(edit)
    swapped: list[tuple[Any, type]] = []
    try:
        for index, layer_edits in sorted(grouped.items()):
            layer = blocks[index]
            original = type(layer)
            layer.__class__ = _steering_class(original, layer_edits, mode, alpha)
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
