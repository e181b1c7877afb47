"""Steering modes: what an edit does to the value ``h`` at a site (a layer's output...).

A mode maps ``(h [batch, seq, width], vector, center | None, alpha)`` to ``h'`` of the same
shape and dtype. ``vector`` and ``center`` are ``[width]`` (one for every row) or
``[batch, 1, width]`` (one per row of the forward, e.g. several steering settings batched);
norms and projections act along the last axis only. Every mode is a :class:`SteeringMode`:
``__call__``, ``needs_center`` (a center is required, e.g. reflect), and two hooks that
:func:`~mlx_interp.interventions.edits.steer_sites` (and so ``steer``) honours, with
defaults from :class:`Mode`:

- ``every_layer``: the edit is applied at the same kind of site in every decoder layer, not
  only at the layer it names (:class:`AblateAllLayersMode`);
- ``for_layer(layer) -> mode``: the mode bound to the layer it edits, called before any
  layer is touched (:class:`ConditionalMode` picks or checks its probe's layer there).

Modes are chosen by name (:data:`MODES`: one per file of ``conf/steer/mode/``) or by Hydra
``_target_``, through the one factory (:func:`make_mode`, :mod:`mlx_interp.factory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import numpy as np

from mlx_interp.errors import ConfigError
from mlx_interp.factory import Registry, build

__all__ = [
    "MODES",
    "AblateAllLayersMode",
    "AblateMode",
    "AddMode",
    "CallableMode",
    "ConditionalMode",
    "Mode",
    "NormPreservingMode",
    "ReflectMode",
    "SteeringError",
    "SteeringMode",
    "SubtractMode",
    "PLAIN_MODES",
    "load_probe",
    "make_mode",
    "mode_name",
]


class SteeringError(ConfigError):
    """A steering request that cannot be applied (bad vector, alpha, width or mode)."""


@runtime_checkable
class SteeringMode(Protocol):
    """What every steering mode provides (:class:`Mode` gives the defaults)."""

    @property
    def needs_center(self) -> bool:
        """True: every edit must carry a center (reflect)."""
        ...

    @property
    def every_layer(self) -> bool:
        """True: applied at the same kind of site in every layer."""
        ...

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array: ...

    def for_layer(self, layer: int) -> SteeringMode:
        """This mode bound to the layer it edits (before any layer is touched)."""
        ...


class Mode:
    """Base of the modes: no center needed, edits only its own layer, one copy for all."""

    @property
    def needs_center(self) -> bool:
        return False

    @property
    def every_layer(self) -> bool:
        return False

    def for_layer(self, layer: int) -> Any:
        """The mode that edits ``layer`` (this one: most modes need no binding)."""
        return self


class CallableMode(Mode):
    """A plain function ``fn(h, vector, center, alpha) -> h'`` as a mode (no hooks)."""

    def __init__(self, fn: Any, needs_center: bool = False):
        self.fn, self._needs_center = fn, bool(needs_center)

    @property
    def needs_center(self) -> bool:
        return self._needs_center

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        return self.fn(h, vector, center, alpha)


def _unit(vector: mx.array) -> mx.array:
    """``vector / |vector|`` in the vector's dtype, along the last axis (``[d]`` or
    ``[batch, 1, d]``: one unit vector per row)."""
    if vector.ndim == 1:
        return vector / mx.linalg.norm(vector)
    return vector / mx.linalg.norm(vector, axis=-1, keepdims=True)


def _along(x: mx.array, u: mx.array) -> mx.array:
    """``x . u`` along the last axis: ``[batch, seq]`` for ``x [batch, seq, d]`` and ``u``
    ``[d]`` or ``[batch, 1, d]`` (one direction per row)."""
    if u.ndim == 1:
        return x @ u
    return (x @ mx.swapaxes(u, -1, -2))[..., 0]


class AddMode(Mode):
    """``h + alpha * vector``: push every position along the direction."""

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        return h + alpha * vector


class SubtractMode(Mode):
    """``h - alpha * vector``: push every position against the direction."""

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        return h - alpha * vector


class ReflectMode(Mode):
    """Mirror across the hyperplane through ``center`` orthogonal to ``vector``.

    With ``u = vector / |vector|`` and ``c = (h - center) . u``: ``h' = h - 2 * alpha * c * u``.
    ``alpha = 1`` is the exact mirror (the positive class mean lands on the negative one when
    ``center`` is their midpoint and ``vector`` their difference); ``alpha`` scales the move.
    """

    @property
    def needs_center(self) -> bool:
        return True

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        if center is None:
            raise ValueError(
                "reflect mode needs a center (the midpoint of the two class means); "
                "pass LayerEdit(..., center=...)"
            )
        u = _unit(vector)
        coefficient = (2 * alpha) * _along(h - center, u)  # [batch, seq]
        return h - coefficient[..., None] * u


class AblateMode(Mode):
    """``h - alpha * (h . u) u`` with ``u = vector / |vector|``; ``alpha = 1`` projects it out."""

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        u = _unit(vector)
        coefficient = alpha * _along(h, u)  # [batch, seq]
        return h - coefficient[..., None] * u


class AblateAllLayersMode(AblateMode):
    """Directional ablation after every decoder layer (Arditi et al. 2024).

    The edit's vector (the direction of the layer the edit names, e.g. ``steer.layer``) is
    projected out, ``h - alpha (h . u) u``, of the residual stream after each decoder layer,
    so no layer can write it back. ``alpha = 1`` removes it fully.
    """

    @property
    def every_layer(self) -> bool:
        return True


class WrappingMode(Mode):
    """Base of the modes that wrap another (``self.inner``): a centre is needed exactly when
    the inner mode needs one (norm-preserving, conditional, position-gated modes)."""

    inner: Any

    @property
    def needs_center(self) -> bool:
        return self.inner.needs_center


class NormPreservingMode(WrappingMode):
    """Run ``inner``, then rescale each position back to the norm it had before the edit.

    ``h' = inner(h) * |h| / |inner(h)|``, norms over ``d_model`` per position (float32), so
    the edit turns the hidden state without growing or shrinking it: downstream RMSNorms see
    the same scale as unsteered. ``inner`` is a mode name or config (default ``reflect``).
    """

    def __init__(self, inner: Any = "reflect"):
        self.inner = make_mode(inner)

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        edited = self.inner(h, vector, center, alpha)
        before = mx.linalg.norm(h.astype(mx.float32), axis=-1, keepdims=True)
        after = mx.linalg.norm(edited.astype(mx.float32), axis=-1, keepdims=True)
        scale = before / mx.maximum(after, np.finfo(np.float32).tiny)  # [batch, seq, 1]
        return edited * scale.astype(h.dtype)


def load_probe(path: str | Path, contrast: str | None, layer: int) -> tuple[np.ndarray, float]:
    """(coef [d_model], intercept) of the probe ``{contrast}/{layer}`` in a probes file.

    The file (the probes stage's ``probes.safetensors``) holds ``{contrast}/{layer}/coef``
    ``[d_model]`` and ``{contrast}/{layer}/intercept`` ``[1]`` with
    ``p = sigmoid(h . coef + intercept)`` on the raw hidden state. ``contrast`` may be None
    when the file holds one contrast.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise SteeringError(
            f"probe file {path} does not exist; run the probes stage (probes.safetensors) or "
            "fix steer.mode.probe_path"
        )
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise SteeringError(f"{path}: not a readable safetensors probe file ({err})") from err
    contrasts = sorted({key.split("/")[0] for key in tensors if key.count("/") == 2})
    if contrast is None:
        if len(contrasts) != 1:
            raise SteeringError(
                f"{path} holds probes of {len(contrasts)} contrasts {contrasts}; name one with "
                "steer.mode.contrast"
            )
        contrast = contrasts[0]
    key = f"{contrast}/{layer}"
    if f"{key}/coef" not in tensors or f"{key}/intercept" not in tensors:
        layers = sorted(
            int(k.split("/")[1]) for k in tensors if k.startswith(f"{contrast}/") and "coef" in k
        )
        raise SteeringError(
            f"{path} has no probe {key!r} (contrasts: {contrasts}; layers of {contrast!r}: "
            f"{layers}); fit probes at the steered layer or set steer.mode.probe_layer"
        )
    coef = np.asarray(tensors[f"{key}/coef"], dtype=np.float32).reshape(-1)
    intercept = np.asarray(tensors[f"{key}/intercept"], dtype=np.float32).reshape(-1)
    if intercept.size != 1 or not np.all(np.isfinite(coef)) or not np.isfinite(intercept[0]):
        raise SteeringError(f"{path}: probe {key!r} must be a finite coef and one intercept")
    return coef, float(intercept[0])


class ConditionalMode(WrappingMode):
    """Apply ``inner`` only at positions where a linear probe on ``h`` fires.

    The probe reads the hidden state the mode receives (the steered layer's output, before
    the edit): ``p = sigmoid(h . coef + intercept)`` per position, in float32. Where
    ``p > threshold`` the position gets ``inner``'s edit; elsewhere it is left exactly as it
    was. During generation each new token is gated on its own hidden state.

    The probe comes from ``coef``/``intercept`` arrays, or from a probes file
    (``probe_path``, ``contrast``, ``probe_layer``). With a file and no ``probe_layer``, the
    probe of the steered layer is used; a ``probe_layer`` other than the steered layer is an
    error (the probe would read a hidden state it was not fitted on).
    """

    def __init__(
        self,
        inner: Any = "add",
        threshold: float = 0.5,
        probe_path: str | None = None,
        contrast: str | None = None,
        probe_layer: int | None = None,
        coef: Any = None,
        intercept: float | None = None,
    ):
        if not 0.0 <= float(threshold) <= 1.0:
            raise SteeringError(f"probe threshold must be in [0, 1], got {threshold}")
        if (coef is None) == (probe_path is None):
            raise SteeringError(
                "a conditional mode needs exactly one probe source: probe_path (a probes "
                "safetensors file) or coef and intercept arrays"
            )
        self.inner = make_mode(inner)
        self.threshold = float(threshold)
        self.probe_path, self.contrast, self.probe_layer = probe_path, contrast, probe_layer
        self.coef: np.ndarray | None = None
        self.intercept = 0.0
        if coef is not None:
            self._set_probe(coef, 0.0 if intercept is None else intercept)
        elif probe_layer is not None and probe_path is not None:
            self._set_probe(*load_probe(probe_path, contrast, int(probe_layer)))

    def _set_probe(self, coef: Any, intercept: Any) -> None:
        coef = np.asarray(coef, dtype=np.float32).reshape(-1)
        intercept = float(np.asarray(intercept, dtype=np.float32).reshape(-1)[0])
        if not np.all(np.isfinite(coef)) or not np.isfinite(intercept):
            raise SteeringError("the probe's coef and intercept must be finite")
        self.coef, self.intercept = coef, intercept
        self._coef_mx = mx.array(coef)

    def for_layer(self, layer: int) -> ConditionalMode:
        """This mode with the probe of ``layer`` (loaded from the file when needed)."""
        if self.probe_layer is not None and int(self.probe_layer) != layer:
            raise SteeringError(
                f"the probe was fitted at layer {self.probe_layer} but the edit is at layer "
                f"{layer}; use the probe of the steered layer (steer.mode.probe_layer: {layer} "
                "or null)"
            )
        if self.coef is not None:
            return self
        bound = ConditionalMode.__new__(ConditionalMode)
        bound.__dict__.update(self.__dict__)
        bound.probe_layer = layer
        assert self.probe_path is not None  # without coef, the probe comes from a file
        bound._set_probe(*load_probe(self.probe_path, self.contrast, layer))
        return bound

    def fires(self, h: mx.array) -> mx.array:
        """bool ``[batch, seq]``: where the probe's probability exceeds the threshold."""
        if self.coef is None:
            raise SteeringError(
                "this conditional mode has no probe yet: give probe_layer, or steer through "
                "mlx_interp.interventions.steering.steer, which binds the probe of the "
                "steered layer"
            )
        if h.shape[-1] != self.coef.shape[0]:
            raise SteeringError(
                f"the probe has {self.coef.shape[0]} weights but the hidden state has "
                f"d_model={h.shape[-1]}; use a probe fitted on this model's activations"
            )
        logit = h.astype(mx.float32) @ self._coef_mx + self.intercept
        return mx.sigmoid(logit) > self.threshold

    def __call__(
        self, h: mx.array, vector: mx.array, center: mx.array | None, alpha: float
    ) -> mx.array:
        gate = self.fires(h)[..., None]
        return mx.where(gate, self.inner(h, vector, center, alpha), h)


def add_norm() -> NormPreservingMode:
    """``add``, then each position rescaled to its norm before the edit."""
    return NormPreservingMode("add")


MODES: dict[str, Any] = {  # one name per file of conf/steer/mode/ (checked by a test)
    "add": AddMode,
    "subtract": SubtractMode,
    "reflect": ReflectMode,
    "ablate": AblateMode,
    "ablate_all": AblateAllLayersMode,
    "reflect_norm": NormPreservingMode,  # inner defaults to reflect
    "add_norm": add_norm,
    "conditional": ConditionalMode,  # needs its probe: build it from conf/steer/mode/conditional
}
PLAIN_MODES = [name for name in MODES if name != "conditional"]  # built with no arguments


def mode_name(mode: Any) -> str:
    """A readable name of a mode object: its class, with its inner mode when it wraps one
    (``NormPreservingMode(ReflectMode)``)."""
    name = type(mode).__name__
    return f"{name}({mode_name(mode.inner)})" if isinstance(mode, WrappingMode) else name


def _adapt(obj: Any) -> Mode | None:
    """A callable that is not a :class:`SteeringMode` (a function, or an object with only
    ``__call__`` and maybe ``needs_center``) as a :class:`CallableMode`."""
    if not callable(obj):
        return None
    return CallableMode(obj, getattr(obj, "needs_center", False))


MODE_REGISTRY = Registry(
    what="steering mode",
    plural="modes",
    names=MODES,
    error=SteeringError,
    accepts=lambda obj: isinstance(obj, SteeringMode),
    example="mlx_interp.interventions.steering.AddMode",
    adapt=_adapt,
)


def make_mode(name_or_cfg: Any) -> SteeringMode:
    """A mode from a name in :data:`MODES`, a config with ``_target_``, a mode class or
    object, or a plain function ``(h, vector, center, alpha) -> h'``."""
    return build(name_or_cfg, MODE_REGISTRY)
