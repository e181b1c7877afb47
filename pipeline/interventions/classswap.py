"""The one class-swap core that capture, steering and sites share.

MLX has no forward hooks. To record or edit what a module computes, the ``__class__`` of
that one instance is swapped for a one-off subclass whose ``__call__`` wraps the original,
and restored in ``finally``. No module is replaced, so parameter names, saving and
quantization are untouched. The helpers here also resolve layer indices, check steering
strengths and keep per-dtype copies of the vectors an edit adds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.errors import MlxInterpError
from mlx_interp.models.anatomy import anatomy_of

__all__ = [
    "LayerIndexError",
    "Recorder",
    "StopForward",
    "VectorCache",
    "check_alpha",
    "decoder_layers",
    "model_width",
    "resolve_layers",
    "subclass_with_call",
    "swapped",
]


class LayerIndexError(MlxInterpError, IndexError):
    """A requested layer index is outside ``-n_layers..n_layers - 1``."""


class StopForward(Exception):
    """Raised after the highest recorded layer to skip the rest of the forward pass."""


class Recorder:
    """Base of the recorders capture and sites yield: ``run`` calls a forward that may stop
    early (after the last recorded layer); the recorded outputs are what matters then."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)``; return its result, or ``None`` if stopped early."""
        try:
            return fn(*args, **kwargs)
        except StopForward:
            return None


def decoder_layers(model: Any) -> list:
    """The decoder blocks of ``model``, as its anatomy names them (``model.layers`` in
    mlx-lm). Raises :class:`~mlx_interp.models.anatomy.NoLayersError` (a ``TypeError``)
    naming the config key ``model.anatomy`` when there are none."""
    return anatomy_of(model).layers


def resolve_layers(layers: Sequence[int] | int | None, n_layers: int) -> list[int]:
    """Normalize layer indices to sorted, unique, non-negative ints.

    ``None`` selects every layer; negative indices count from the end (``-1`` = last layer).
    Raises :class:`LayerIndexError` for an index outside ``-n_layers..n_layers - 1``.
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    resolved = set()
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"layer indices must be ints, got {index!r}")
        if not -n_layers <= index < n_layers:
            raise LayerIndexError(
                f"layer {index} is out of range for a model with {n_layers} layers "
                f"(valid: {-n_layers}..{n_layers - 1}); pick an index in that range, "
                "negative indices count from the last layer"
            )
        resolved.add(int(index) % n_layers)
    if not resolved:
        raise ValueError("no layers selected: pass None for all layers or a non-empty list")
    return sorted(resolved)


def model_width(model: Any) -> int | None:
    """``d_model`` of the model's residual stream (its args, else its embedding), if known."""
    return anatomy_of(model).d_model


def subclass_with_call(original: type, prefix: str, call: Callable[..., Any]) -> type:
    """A one-off subclass of ``original`` whose ``__call__`` is ``call`` (for class swaps)."""
    name = f"{prefix}{original.__name__}"
    namespace = {"__call__": call, "__module__": original.__module__, "__qualname__": name}
    return type(name, (original,), namespace)


@contextmanager
def swapped(module: Any, prefix: str, call: Callable[..., Any]) -> Iterator[None]:
    """Swap ``module.__class__`` for a subclass with ``call`` as ``__call__``; restore after."""
    original = type(module)
    module.__class__ = subclass_with_call(original, prefix, call)
    try:
        yield
    finally:
        module.__class__ = original


def check_alpha(alpha: Any, error: type[Exception]) -> float:
    """``alpha`` as a finite Python float, else ``error`` naming a valid range."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise error(f"alpha must be a real number (e.g. 0.5..4), got {alpha!r}")
    if not np.isfinite(alpha):
        raise error(
            f"alpha is {alpha}; steering needs a finite alpha (e.g. 0.5..4; 0 disables the edit)"
        )
    return float(alpha)


class VectorCache:
    """``(vector, center)`` numpy pairs as ``mx.array`` in each dtype a forward asks for.

    An edit runs in the dtype of the hidden state it edits (float32 on the CPU, float16 or
    bfloat16 on Metal), so each dtype's copy is made once and reused for every forward.
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> None:
        self.pairs = list(pairs)
        self._by_dtype: dict[Any, list[tuple[mx.array, mx.array | None]]] = {}

    def __call__(self, dtype: Any) -> list[tuple[mx.array, mx.array | None]]:
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = [
                (mx.array(v).astype(dtype), None if c is None else mx.array(c).astype(dtype))
                for v, c in self.pairs
            ]
        return self._by_dtype[dtype]
