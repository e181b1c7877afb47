"""Edits at sites: one implementation of steering (vector + mode) and function edits.

Every edit, a residual-stream ``steer`` included, goes through here: validated before any
module is touched, grouped per site (several edits at one site apply in order), placed by
the mode's optional hooks (``every_layer``: the same kind of site at every layer;
``for_layer``: the mode bound to each edited layer), confined to ``positions``, and run by
:func:`~mlx_interp.interventions.site_hooks.site_hook` (the class-swap core). A recording
entered inside an edit of the same site sees the edited value; one entered outside sees the
value before it: hooks at a site run in the order their contexts were entered.

- :func:`steer_sites` takes :class:`SiteEdit` (a vector, and a center for reflect) and a
  steering mode (a name in ``MODES``, a ``_target_`` config or a mode object);
- :func:`edit_sites` takes any Python function of the site's value (``{site: fn}`` or
  :class:`Edit`), e.g. ``lambda pattern: pattern * keep`` at ``blocks.3.attn.hook_pattern``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.classswap import VectorCache, check_alpha
from mlx_interp.interventions.modes import SteeringError, make_mode
from mlx_interp.interventions.site_hooks import (
    KEY_AXIS_KINDS,
    head_shape,
    position_clock,
    resolve_sites,
    site_hook,
    site_width,
)
from mlx_interp.interventions.site_names import Site, SiteError
from mlx_interp.interventions.token_positions import Positions, where_positions
from mlx_interp.models.anatomy import anatomy_of

__all__ = ["Edit", "SiteEdit", "edit_sites", "steer_sites"]
FUNCTION_ONLY = ("q", "k", "v", "attn_scores", "pattern")  # values with a head axis


@dataclass(frozen=True)
class SiteEdit:
    """One steering edit at ``site``: ``vector`` (and ``center``, for reflect) of its width,
    at ``positions`` (None: every position of every forward; see
    :mod:`~mlx_interp.interventions.token_positions`).

    For a ``z`` site (per-head outputs), ``vector`` is ``[n_heads, head_dim]`` or flat
    ``[n_heads * head_dim]`` and edits the output projection's input; for the MLP's neurons
    it is ``[d_mlp]``; elsewhere ``[d_model]``, or ``[batch, 1, d_model]`` (one per row).
    """

    site: Any
    vector: np.ndarray
    center: np.ndarray | None = None
    positions: Any = None


@dataclass(frozen=True)
class Edit:
    """A function edit: ``fn(value) -> value`` of the same shape at ``site``, at ``positions``."""

    site: Any
    fn: Callable[[mx.array], mx.array]
    positions: Any = None


def _vector(name: str, value: Any, index: int, site: Site, shapes: list[tuple]) -> np.ndarray:
    """``value`` as a finite float32 array of one of ``shapes`` (flat), or ``[batch, 1,
    width]`` (kept: one vector per row of the forward)."""
    array = np.asarray(value)
    width = shapes[0][0]
    per_row = array.ndim == 3 and array.shape[1] == 1 and width in (None, array.shape[2])
    fits = per_row or any(
        len(shape) == array.ndim
        and all(w in (None, d) for w, d in zip(shape, array.shape, strict=True))
        for shape in shapes
    )  # a None width (undeclared d_model) is checked in the forward instead
    if not np.issubdtype(array.dtype, np.number) or not fits:
        what = {"z": "n_heads, head_dim", "logits": "vocab"}.get(site.kind, "d_model")
        what = "d_mlp" if site.kind.startswith("mlp_p") else what
        hidden = f"; the hidden size (d_model) is {width}" if what == "d_model" and width else ""
        raise SteeringError(
            f"edit {index} at {site}: {name} has shape {array.shape} ({array.dtype}) but the site "
            f"takes a numeric vector of shape {' or '.join(map(str, shapes))} ({what}){hidden}; "
            "use a direction computed on this model's activations"
        )
    if not np.all(np.isfinite(array)):
        raise SteeringError(
            f"edit {index} at {site}: {name} contains NaN or inf; recompute it from finite "
            "activations (a NaN often means an empty class when taking a mean)"
        )
    return (array if per_row else array.reshape(-1)).astype(np.float32)


def _prepare(model: Any, edits: Sequence[SiteEdit], mode: Any, kind: str) -> dict[Site, list]:
    """Validate ``edits``; site -> [(vector, center, Positions)] in edit order."""
    grouped: dict[Site, list] = {}
    shared_width: dict[str, int] = {}  # without model args the first vector sets d_model
    for index, edit in enumerate(edits):
        if not isinstance(edit, SiteEdit):
            raise SteeringError(f"edit {index} is a {type(edit).__name__}, not a {kind}")
        (site,) = resolve_sites(model, [edit.site])
        if site.kind in FUNCTION_ONLY:
            raise SteeringError(
                f"edit {index} at {site}: a {site.kind} value has a head axis; a steering mode "
                "edits a vector of one width, so use a function edit (edit_sites) here"
            )
        width = site_width(model, site)
        if width is None:
            width = shared_width.get(site.kind)
        shapes = [(width,)] + ([head_shape(model, site.layer)] if site.kind == "z" else [])
        vector = _vector("vector", edit.vector, index, site, shapes)
        shared_width.setdefault(site.kind, vector.shape[-1])
        if not np.linalg.norm(vector.astype(np.float64)) > 0:
            raise SteeringError(
                f"edit {index}: the steering vector at {site} is all zeros, so it has no "
                "direction; check that the two classes differ or drop this edit"
            )
        center = None
        if edit.center is not None:
            center = _vector("center", edit.center, index, site, [(vector.shape[-1],)])
        elif mode.needs_center:
            raise SteeringError(
                f"edit {index} at {site}: {type(mode).__name__} needs a center (the midpoint "
                f"of the two class means); pass {kind}(..., center=...)"
            )
        grouped.setdefault(site, []).append((vector, center, Positions(edit.positions)))
    return grouped


def _steering_fn(site: Site, group: list, mode: Any, alpha: float, clock: Any) -> Callable:
    """The hook applying ``mode`` with each ``(vector, center)`` of ``group`` at its
    positions to the site's ``[..., width]`` value."""
    arrays_for = VectorCache([(vector, center) for vector, center, _ in group])
    width = group[0][0].shape[-1]

    def edit(h: mx.array) -> mx.array:
        if h.shape[-1] != width:
            raise SteeringError(
                f"{site} has width {h.shape[-1]} but the steering vector has {width} entries "
                f"(d_model={h.shape[-1]}); use a direction captured at this site"
            )
        for (vector, center), (_, _, positions) in zip(arrays_for(h.dtype), group, strict=True):

            def step(x: mx.array, vector=vector, center=center) -> mx.array:
                return mode(x, vector, center, alpha)

            h = where_positions(step, positions, clock, 1)(h)
        return h

    return edit


@contextmanager
def steer_sites(
    model: Any, edits: Sequence[SiteEdit], mode: Any, alpha: float, _kind: str = "SiteEdit"
) -> Iterator[None]:
    """Edit the value at each edit's site in every forward inside (generation included).

    ``mode`` is a steering mode (name, ``_target_`` config or object), applied as
    ``mode(h, vector, center, alpha)`` on the site's ``[..., width]`` value. Several edits
    at one site apply in order; an ``every_layer`` mode edits the same kind of site in every
    layer, and ``for_layer`` binds the mode to each edited layer. Everything is validated
    before any module is touched: :class:`SteeringError` / :class:`SiteError` /
    ``LayerIndexError`` name the problem. Empty ``edits`` is a no-op.
    """
    if not edits:
        yield
        return
    mode = make_mode(mode)
    alpha = check_alpha(alpha, SteeringError)
    grouped = _prepare(model, edits, mode, _kind)
    if mode.every_layer:
        every: dict[Site, list] = {}
        for site, group in grouped.items():
            for layer in range(anatomy_of(model).n_layers):
                every.setdefault(Site(layer, site.kind), []).extend(group)
        grouped = every
    modes = {site: mode.for_layer(site.layer) for site in grouped}  # may raise: not swapped
    placed = any(not p.every for group in grouped.values() for _, _, p in group)
    with ExitStack() as stack:
        clock = stack.enter_context(position_clock(model)) if placed else None
        for site, group in sorted(grouped.items()):
            fn = _steering_fn(site, group, modes[site], alpha, clock)
            stack.enter_context(site_hook(model, site, fn, "Steering", flat=True))
        yield


def _checked(site: Site, fn: Callable) -> Callable:
    """``fn`` with its result checked: same shape as its input, a ``mx.array``."""

    def edit(value: mx.array) -> mx.array:
        out = fn(value)
        if not isinstance(out, mx.array) or tuple(out.shape) != tuple(value.shape):
            got = tuple(out.shape) if isinstance(out, mx.array) else type(out).__name__
            raise SiteError(
                f"the edit at {site} returned {got} for a value of shape {tuple(value.shape)}; "
                "an edit function must return an mx.array of the shape it was given"
            )
        return out

    return edit


@contextmanager
def edit_sites(
    model: Any, edits: Mapping[Any, Callable] | Sequence[Edit], positions: Any = None
) -> Iterator[None]:
    """Replace the value at each site by ``fn(value)`` in every forward inside.

    ``edits``: ``{site: fn}`` (each at ``positions``) or a list of :class:`Edit` (each with
    its own). ``fn`` gets the site's value as recorded (``[batch, seq, ...]``; attention
    scores and patterns ``[batch, heads, query, key]``) and returns one of the same shape;
    at chosen positions only those tokens take the new value (queries, for patterns).
    """
    if isinstance(edits, Mapping):
        edits = [Edit(site, fn, positions) for site, fn in edits.items()]
    prepared = []
    for index, edit in enumerate(edits):
        if not isinstance(edit, Edit) or not callable(edit.fn):
            raise SiteError(f"edit {index} must be an Edit(site, fn) with a callable fn")
        (site,) = resolve_sites(model, [edit.site])
        prepared.append((site, edit.fn, Positions(edit.positions)))
    placed = any(not p.every for _, _, p in prepared)
    with ExitStack() as stack:
        clock = stack.enter_context(position_clock(model)) if placed else None
        for site, fn, where in sorted(prepared, key=lambda e: e[0]):
            axis = 2 if site.kind in KEY_AXIS_KINDS else 1
            hook = where_positions(_checked(site, fn), where, clock, axis)
            stack.enter_context(site_hook(model, site, hook, "Editing"))
        yield
