"""Capture and steering at sites inside a decoder layer, not only its residual output.

A site is named like a parameter path: ``layers.{i}`` (residual stream after layer ``i``),
``layers.{i}.attn`` (attention block output after the output projection, before the residual
add), ``layers.{i}.mlp`` (MLP block output) and ``layers.{i}.attn.heads`` (per-head attention
outputs, the output projection's input reshaped to ``[n_heads, head_dim]``). ``self_attn`` is
accepted for ``attn``, and a leading ``model.`` is ignored.

TransformerLens's names mean the same sites, so code written for it reads naturally here:
``blocks.8.hook_resid_post`` = ``layers.8``, ``blocks.8.hook_attn_out`` = ``layers.8.attn``,
``blocks.8.hook_mlp_out`` = ``layers.8.mlp``, ``blocks.8.attn.hook_z`` =
``layers.8.attn.heads``, and the shorthand pairs ``("resid_post", 8)``, ``("attn_out", 8)``,
``("mlp_out", 8)``, ``("z", 8)``. Layers may be negative everywhere (-1: the last layer).

The mechanism is :mod:`mlx_interp.interventions.classswap`: the ``__class__`` of the
submodule instance (the layer, its attention or MLP module, or the attention's output
projection, a ``Linear`` or ``QuantizedLinear``) is swapped for a one-off subclass whose
``__call__`` records or edits, and restored in ``finally``. No module is replaced.
Submodules are found by name (``self_attn``/``attn``, ``mlp``, ``o_proj``/``c_proj``...),
which covers llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, gpt2 and olmo2. In
architectures with a norm after the block (gemma2/3, olmo2) ``attn``/``mlp`` are the block
outputs before that norm.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.errors import ConfigError
from mlx_interp.interventions.capture import POSITIONS, padded_batch, reduce_positions
from mlx_interp.interventions.classswap import (
    Recorder,
    StopForward,
    VectorCache,
    check_alpha,
    decoder_layers,
    model_width,
    resolve_layers,
    swapped,
)
from mlx_interp.interventions.steering import SteeringError, make_mode
from mlx_interp.models.anatomy import AnatomyError, anatomy_of

__all__ = [
    "SHORTHAND",
    "SITE_KINDS",
    "Site",
    "SiteEdit",
    "SiteError",
    "SiteRecorder",
    "capture_sites",
    "capture_sites_batch",
    "head_shape",
    "parse_site",
    "resolve_sites",
    "site_module",
    "site_width",
    "steer_sites",
]

SITE_KINDS = ("resid", "attn", "mlp", "heads")
_SUFFIX = {"resid": "", "attn": ".attn", "mlp": ".mlp", "heads": ".attn.heads"}
_PATTERN = re.compile(r"^(?:model\.)?layers\.(-?\d+)(?:\.(self_attn|attn|mlp)(\.heads)?)?$")
_WHAT = {"attn": "attention", "mlp": "MLP", "o_proj": "output projection"}
_TL_PATTERN = re.compile(
    r"^blocks\.(-?\d+)\.(hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)$"
)
_TL_KINDS = {
    "hook_resid_post": "resid",
    "hook_attn_out": "attn",
    "hook_mlp_out": "mlp",
    "attn.hook_z": "heads",
}
SHORTHAND = {"resid_post": "resid", "attn_out": "attn", "mlp_out": "mlp", "z": "heads"}
_EXAMPLES = (
    "layers.8, layers.8.attn (or self_attn), layers.8.mlp, layers.8.attn.heads, "
    "blocks.8.hook_resid_post, blocks.8.hook_mlp_out, or ('resid_post', 8)"
)


class SiteError(ConfigError):
    """A site name that does not parse, or a site this model's layers do not have."""


@dataclass(frozen=True, order=True)
class Site:
    """A place in the network: decoder ``layer`` and ``kind`` (one of :data:`SITE_KINDS`)."""

    layer: int
    kind: str = "resid"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; valid: {', '.join(SITE_KINDS)}")

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``layers.8.mlp`` (the key of captured outputs)."""
        return f"layers.{self.layer}{_SUFFIX[self.kind]}"

    def __str__(self) -> str:
        return self.name


def parse_site(name: str | Site | tuple[str, int]) -> Site:
    """``"layers.8.mlp"``, ``"blocks.8.hook_mlp_out"`` or ``("mlp_out", 8)`` -> ``Site(8, "mlp")``.

    The layer may be negative (counted from the end; resolved by :func:`resolve_sites`).
    """
    if isinstance(name, Site):
        return name
    if isinstance(name, tuple) and len(name) == 2:
        kind, layer = name
        if kind not in SHORTHAND or isinstance(layer, bool) or not isinstance(layer, int):
            raise SiteError(
                f"cannot parse site {name!r}: a pair is (kind, layer) with kind one of "
                f"{', '.join(SHORTHAND)} and an int layer; valid forms: {_EXAMPLES}"
            )
        return Site(layer, SHORTHAND[kind])
    if not isinstance(name, str):
        raise SiteError(f"a site is a name like 'layers.8.mlp', got {type(name).__name__}")
    tl = _TL_PATTERN.match(name.strip())
    if tl is not None:
        return Site(int(tl.group(1)), _TL_KINDS[tl.group(2)])
    match = _PATTERN.match(name.strip())
    if match is None:
        raise SiteError(f"cannot parse site {name!r}; valid forms: {_EXAMPLES}")
    number, block, heads = match.groups()
    kind = "resid" if block is None else "heads" if heads else block.replace("self_", "")
    if heads and block == "mlp":
        raise SiteError(f"site {name!r}: heads exist only under attn; valid forms: {_EXAMPLES}")
    return Site(int(number), kind)


def site_module(model: Any, site: Site) -> Any:
    """The module instance whose class is swapped for ``site`` (layer index already resolved)."""
    anatomy = anatomy_of(model)
    if site.kind == "resid":
        return anatomy.layers[site.layer]
    parts = anatomy.layer(site.layer)
    role = {"mlp": "mlp", "attn": "attn", "heads": "o_proj"}[site.kind]
    try:
        if site.kind == "heads":
            anatomy.require(parts.attn, "attn", "attention", site.layer)
        return anatomy.require(getattr(parts, role), role, _WHAT[role], site.layer)
    except AnatomyError as err:
        raise SiteError(str(err)) from err


def head_shape(model: Any, layer: int) -> tuple[int, int]:
    """``(n_heads, head_dim)`` of the attention at (resolved) ``layer``, from the anatomy."""
    site_module(model, Site(layer, "heads"))  # a SiteError naming what exists
    parts = anatomy_of(model).layer(layer)
    if not parts.n_heads or not parts.head_dim:
        raise SiteError(
            f"layer {layer}'s attention ({type(parts.attn).__name__}) declares no head count "
            f"(n_heads), so its heads cannot be split; use layers.{layer}.attn instead, or "
            "give it with the config key model.anatomy (e.g. model.anatomy={n_heads: 8})"
        )
    return parts.n_heads, parts.head_dim


def site_width(model: Any, site: Site) -> int | None:
    """Width of the last axis an edit at ``site`` acts on: n_heads * head_dim for heads, else
    d_model as declared in ``model.args`` (None when undeclared: checked in the forward)."""
    if site.kind == "heads":
        n_heads, head_dim = head_shape(model, site.layer)
        return n_heads * head_dim
    return model_width(model)


def resolve_sites(model: Any, sites: Sequence[str | Site] | str | Site) -> list[Site]:
    """Parse ``sites``, resolve negative layers, check each exists; sorted and unique."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    if not sites:
        raise SiteError(f"no sites selected; pass names such as {_EXAMPLES}")
    n_layers = len(decoder_layers(model))
    resolved = set()
    for site in map(parse_site, sites):
        (layer,) = resolve_layers([site.layer], n_layers)
        site = Site(layer, site.kind)
        site_module(model, site)  # raises SiteError naming what exists
        if site.kind == "heads":
            head_shape(model, layer)
        resolved.add(site)
    return sorted(resolved)


class SiteRecorder(Recorder):
    """Outputs recorded by :func:`capture_sites`.

    Attributes:
        sites: the resolved sites, sorted by layer.
        outputs: canonical site name -> output in the latest forward (lazy ``mx.array``):
            ``[batch, seq, d_model]``, or ``[batch, seq, n_heads, head_dim]`` for heads.
    """

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self.outputs: dict[str, mx.array] = {}


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _recording_call(original: type, site: Site, n_heads: int, rec: SiteRecorder):
    """``__call__`` recording the module output (or, for heads, its input) into ``rec``."""
    original_call = original.__call__
    name = site.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if site.kind == "heads":
            x = args[0]
            rec.outputs[name] = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
        out = original_call(self, *args, **kwargs)
        if site.kind != "heads":
            rec.outputs[name] = _first(out)
        return out

    return __call__


@contextmanager
def capture_sites(
    model: Any, sites: Sequence[str | Site] | str | Site, stop_after_last: bool = False
) -> Iterator[SiteRecorder]:
    """Record the outputs at ``sites`` (names or :class:`Site`) in every forward inside.

    Usage::

        with capture_sites(model, ["layers.2.mlp", "layers.2.attn.heads"]) as rec:
            model(tokens)
        rec.outputs["layers.2.mlp"]  # [batch, seq, d_model]

    With ``stop_after_last=True`` the forward stops after the highest selected layer (wrap it
    in ``rec.run(model, tokens)``). Inside :func:`steer_sites`, edited outputs are recorded.
    """
    selected = resolve_sites(model, sites)
    recorder = SiteRecorder(selected)
    with ExitStack() as stack:
        for site in selected:
            n_heads = head_shape(model, site.layer)[0] if site.kind == "heads" else 0
            call = _recording_call(type(site_module(model, site)), site, n_heads, recorder)
            stack.enter_context(swapped(site_module(model, site), "Capturing", call))
        if stop_after_last:  # outermost swap of the top layer: runs (and records), then stops
            layer = decoder_layers(model)[selected[-1].layer]
            original_call = type(layer).__call__

            def stop_call(self: Any, *args: Any, **kwargs: Any) -> Any:
                original_call(self, *args, **kwargs)
                raise StopForward

            stack.enter_context(swapped(layer, "Stopping", stop_call))
        try:
            yield recorder
        except StopForward:
            pass


def capture_sites_batch(
    model: Any,
    sequences: list[list[int]],
    sites: Sequence[str | Site] | str | Site,
    positions: str = "last",
    pad_id: int = 0,
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Capture ``sites`` for one right-padded batch, like ``capture.capture_batch``.

    Returns canonical site name -> ``"last"``/``"mean"``: float32 ``[batch, d_model]`` (heads:
    ``[batch, n_heads, head_dim]``); ``"all"``: list of float32 ``[len_i, ...]`` per sequence.
    """
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; valid: {', '.join(POSITIONS)}")
    tokens, lengths = padded_batch(sequences, pad_id)
    with capture_sites(model, sites, stop_after_last=True) as recorder:
        recorder.run(model, tokens)
    length_array = mx.array(lengths, dtype=mx.int32)
    reduced = {
        site.name: reduce_positions(recorder.outputs[site.name], length_array, positions)
        for site in recorder.sites
    }
    mx.eval(*reduced.values())
    result: dict[str, np.ndarray | list[np.ndarray]] = {}
    for name, values in reduced.items():
        array = np.array(values, dtype=np.float32)
        if positions == "all":
            result[name] = [array[row, :length].copy() for row, length in enumerate(lengths)]
        else:
            result[name] = array
    return result


@dataclass(frozen=True)
class SiteEdit:
    """One steering edit at ``site``: ``vector`` (and ``center``, for reflect) of its width.

    For a heads site, ``vector`` is ``[n_heads, head_dim]`` or flat ``[n_heads * head_dim]``
    and edits the output projection's input; elsewhere it is ``[d_model]``.
    """

    site: str | Site
    vector: np.ndarray
    center: np.ndarray | None = None


def _flat_vector(name: str, value: Any, index: int, site: Site, shapes: list[tuple]) -> np.ndarray:
    """``value`` as a finite float32 flat array; its shape must be one of ``shapes``."""
    array = np.asarray(value)
    fits = any(
        len(shape) == array.ndim
        and all(w in (None, d) for w, d in zip(shape, array.shape, strict=True))
        for shape in shapes
    )  # a None width (undeclared d_model) is checked in the forward instead
    if not np.issubdtype(array.dtype, np.number) or not fits:
        raise SteeringError(
            f"edit {index} at {site}: {name} has shape {array.shape} ({array.dtype}) but the site "
            f"takes a numeric vector of shape {' or '.join(map(str, shapes))}"
            + (" (n_heads, head_dim)" if site.kind == "heads" else " (d_model)")
        )
    if not np.all(np.isfinite(array)):
        raise SteeringError(f"edit {index} at {site}: {name} contains NaN or inf")
    return array.reshape(-1).astype(np.float32)


def _steering_call(original: type, site: Site, edits: list[tuple], mode: Any, alpha: float):
    """``__call__`` applying ``mode`` with each ``(vector, center)`` to the site's value."""
    original_call = original.__call__
    arrays_for = VectorCache(edits)

    def edit(h: mx.array) -> mx.array:
        if h.shape[-1] != edits[0][0].shape[0]:
            raise SteeringError(
                f"{site} has width {h.shape[-1]} but the steering vector has "
                f"{edits[0][0].shape[0]} entries; use a direction captured at this site"
            )
        for vector, center in arrays_for(h.dtype):
            h = mode(h, vector, center, alpha)
        return h

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if site.kind == "heads":  # edit the output projection's input
            return original_call(self, edit(args[0]), *args[1:], **kwargs)
        out = original_call(self, *args, **kwargs)
        return (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)

    return __call__


@contextmanager
def steer_sites(model: Any, edits: Sequence[SiteEdit], mode: Any, alpha: float) -> Iterator[None]:
    """Edit the value at each edit's site in every forward inside (generation included).

    ``mode`` is a steering mode of :mod:`mlx_interp.interventions.steering` (name,
    ``_target_`` config or object), applied as ``mode(h, vector, center, alpha)`` on the
    site's ``[..., width]`` value. Several edits at one site apply in order. The mode hooks
    that :func:`~mlx_interp.interventions.steering.steer` honours apply here too: an
    ``every_layer`` mode edits the same kind of site in every layer, and ``for_layer`` binds
    the mode to each edited layer. Everything is validated before any module is touched;
    :class:`SteeringError` / :class:`SiteError` name the problem.
    """
    if not edits:
        yield
        return
    mode = make_mode(mode)
    alpha = check_alpha(alpha, SteeringError)
    grouped: dict[Site, list[tuple]] = {}
    for index, edit in enumerate(edits):
        if not isinstance(edit, SiteEdit):
            raise SteeringError(f"edit {index} is a {type(edit).__name__}, not a SiteEdit")
        (site,) = resolve_sites(model, [edit.site])
        shapes: list[tuple] = [(site_width(model, site),)]
        if site.kind == "heads":
            shapes.append(head_shape(model, site.layer))
        vector = _flat_vector("vector", edit.vector, index, site, shapes)
        if not np.linalg.norm(vector.astype(np.float64)) > 0:
            raise SteeringError(f"edit {index} at {site}: the vector is all zeros")
        center = None
        if edit.center is not None:
            center = _flat_vector("center", edit.center, index, site, shapes)
        elif getattr(mode, "needs_center", False):
            raise SteeringError(
                f"edit {index} at {site}: {type(mode).__name__} needs a center (the midpoint "
                "of the two class means); pass SiteEdit(..., center=...)"
            )
        grouped.setdefault(site, []).append((vector, center))
    if getattr(mode, "every_layer", False):
        n_layers = len(decoder_layers(model))
        every: dict[Site, list[tuple]] = {}
        for site, site_edits in grouped.items():
            for layer in range(n_layers):
                every.setdefault(Site(layer, site.kind), []).extend(site_edits)
        grouped = every
    bind = getattr(mode, "for_layer", None)
    modes = {site: bind(site.layer) if bind else mode for site in grouped}  # may raise
    with ExitStack() as stack:
        for site, site_edits in sorted(grouped.items()):
            module = site_module(model, site)
            call = _steering_call(type(module), site, site_edits, modes[site], alpha)
            stack.enter_context(swapped(module, "Steering", call))
        yield
