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
    "ModuleHooks",
    "check_alpha",
    "decoder_layers",
    "hooked",
    "hooks_of",
    "hooks_suspended",
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


_HOOKS = "_mlx_interp_hooks"  # class attribute of a hooked one-off class: its ModuleHooks
_SUSPENDED = [0]  # > 0: hooked modules run as if unhooked (self-checks of explicit forwards)


class ModuleHooks:
    """The hooks on one module instance, run by its one-off class in the order they were
    added (so a recording added inside an edit of the same value sees the edited value).

    Points: ``enter`` (``fn(args, kwargs)`` before the call, e.g. a position clock),
    ``input`` (the first argument), ``output`` (the result, or its first element), and the
    inner points of an ``explicit`` forward (``q``, ``pattern``, ``resid_mid``...), which
    replaces the module's own ``__call__`` only while one of its ``inner`` points is hooked.
    """

    def __init__(self, base: type) -> None:
        self.base = base
        self.points: dict[str, list[Callable[..., Any]]] = {}
        self.explicit: Callable[..., Any] | None = None
        self.inner: tuple[str, ...] = ()

    def has(self, point: str) -> bool:
        return point in self.points

    def apply(self, point: str, value: Any) -> Any:
        """``value`` through every hook at ``point``, in order."""
        for fn in self.points.get(point, ()):
            value = fn(value)
        return value


def _hooked_call(hooks: ModuleHooks) -> Callable[..., Any]:
    base_call = hooks.base.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        points = hooks.points
        if not points or _SUSPENDED[0]:
            return base_call(self, *args, **kwargs)
        for fn in points.get("enter", ()):
            fn(args, kwargs)
        if "input" in points:
            args = (hooks.apply("input", args[0]), *args[1:])
        if hooks.explicit is not None and any(p in points for p in hooks.inner):
            out = hooks.explicit(self, hooks, *args, **kwargs)
        else:
            out = base_call(self, *args, **kwargs)
        if "output" in points:
            if isinstance(out, tuple):
                return (hooks.apply("output", out[0]), *out[1:])
            return hooks.apply("output", out)
        return out

    return __call__


def hooks_of(module: Any) -> ModuleHooks | None:
    """The :class:`ModuleHooks` of ``module`` if it is hooked (its class or one above it)."""
    for cls in type(module).__mro__:
        found = cls.__dict__.get(_HOOKS)
        if isinstance(found, ModuleHooks):
            return found
    return None


@contextmanager
def hooked(
    module: Any,
    point: str,
    fn: Callable[..., Any],
    prefix: str = "Hooked",
    explicit: Callable[..., Any] | None = None,
    inner: Sequence[str] = (),
) -> Iterator[None]:
    """Run ``fn`` at ``point`` of ``module`` in every call inside; the class swap core.

    The first hook on a module swaps its ``__class__`` for a one-off subclass (named
    ``prefix`` + the class name) that runs the hooks; later ones join it; the original class
    is restored when the last hook leaves, also after an exception. No module is replaced."""
    found = hooks_of(module)
    hooks: ModuleHooks = found if found is not None else ModuleHooks(type(module))
    if found is None:
        cls = subclass_with_call(type(module), prefix, _hooked_call(hooks))
        setattr(cls, _HOOKS, hooks)
        module.__class__ = cls
    if explicit is not None:
        hooks.explicit, hooks.inner = explicit, tuple(inner)
    hooks.points.setdefault(point, []).append(fn)
    try:
        yield
    finally:
        added = hooks.points.get(point, [])
        for i in range(len(added) - 1, -1, -1):
            if added[i] is fn:
                del added[i]
                break
        if not added:
            hooks.points.pop(point, None)
        if not hooks.points and type(module).__dict__.get(_HOOKS) is hooks:
            module.__class__ = hooks.base  # the last hook left: the original class back


@contextmanager
def hooks_suspended() -> Iterator[None]:
    """Inside, every hooked module runs its own ``__call__`` with no hook (for self-checks)."""
    _SUSPENDED[0] += 1
    try:
        yield
    finally:
        _SUSPENDED[0] -= 1


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
