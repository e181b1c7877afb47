"""Where each site lives in a model, and a hook on it: the one mechanism of every site.

:func:`site_target` maps a :class:`~mlx_interp.interventions.site_names.Site` to the module
instance, the point of its call (``input``, ``output`` or an inner point of an explicit
forward) and the view of the value there, from the model's anatomy:

- ``embed``: the first layer's input (gpt2: the token embedding's output, before the
  positional embedding is added); ``resid_pre``/``resid_post``: a block's input/output;
- ``attn_out``/``mlp_out``: the attention/MLP module's output, before any post-norm
  (gemma2/3, olmo2), so ``o_proj(z) = attn_out`` and ``down(mlp_post) = mlp_out``;
- ``z``: the output projection's input as ``[batch, seq, n_heads, head_dim]``;
- ``mlp_pre`` (the gate's pre-activation in a gated MLP, W_in x in gpt2),
  ``mlp_pre_linear`` (the up projection of a gated MLP): a projection's output (phi3's
  fused gate_up: its first or second half); ``mlp_post`` (the neurons): the down
  projection's input;
- ``q``/``k``/``v``/``attn_scores``/``pattern``: inner points of
  :func:`~mlx_interp.interventions.attention.explicit_attention`; ``resid_mid``: of
  :func:`~mlx_interp.interventions.attention.explicit_block` (post-norm architectures:
  ``resid_mid = resid_pre + post_attn_norm(attn_out)``);
- ``logits``: the model's output.

:func:`site_hook` puts a function on it with :func:`~mlx_interp.interventions.classswap.hooked`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_interp.interventions.attention import (
    ATTENTION_POINTS,
    BLOCK_POINTS,
    explicit_attention,
    explicit_block,
    verify,
)
from mlx_interp.interventions.classswap import hooked, resolve_layers
from mlx_interp.interventions.site_names import EXAMPLES, Site, SiteError, parse_site
from mlx_interp.interventions.token_positions import PositionClock
from mlx_interp.models.anatomy import AnatomyError, anatomy_of

__all__ = [
    "SiteTarget",
    "flat_width",
    "head_shape",
    "position_clock",
    "resolve_sites",
    "site_hook",
    "site_module",
    "site_target",
    "site_width",
]
KEY_AXIS_KINDS = ("attn_scores", "pattern")  # [batch, heads, query, key]: tokens on axis 2


@dataclass(frozen=True)
class SiteTarget:
    """How to reach a site: ``module``, the ``point`` of its call, the axis of token
    positions in the site's value, and ``view``/``put`` between the module's value there
    and the site's (None: the same)."""

    module: Any
    point: str
    seq_axis: int = 1
    explicit: Callable[..., Any] | None = None
    inner: tuple[str, ...] = ()
    check: str | None = None  # "attention" | "block": verified before first use
    view: Callable[[mx.array], mx.array] | None = None
    put: Callable[[mx.array, mx.array], mx.array] | None = None


def _halves(first: bool, d_mlp: int) -> tuple[Callable, Callable]:
    if first:
        return (lambda v: v[..., :d_mlp]), (lambda v, s: mx.concatenate([s, v[..., d_mlp:]], -1))
    return (lambda v: v[..., d_mlp:]), (lambda v, s: mx.concatenate([v[..., :d_mlp], s], -1))


def site_target(model: Any, site: Site, flat: bool = False) -> SiteTarget:
    """The :class:`SiteTarget` of ``site`` (layer resolved); ``flat``: ``z`` as the output
    projection's flat input ``[batch, seq, n_heads * head_dim]`` (vector edits)."""
    anatomy = anatomy_of(model)
    kind, index = site.kind, site.layer
    try:
        if kind == "logits":
            return SiteTarget(anatomy.model, "output")
        if kind == "embed" and anatomy.pos_embed is not None:
            return SiteTarget(anatomy.require(anatomy.embed, "embed", "embedding"), "output")
        if kind in ("embed", "resid_pre", "resid_post"):
            block = anatomy.layers[index]
            return SiteTarget(block, "output" if kind == "resid_post" else "input")
        parts = anatomy.layer(index)
        need = anatomy.require

        def attn() -> Any:
            return need(parts.attn, "attn", "attention", index)

        if kind == "attn_out":
            return SiteTarget(attn(), "output")
        if kind == "mlp_out":
            return SiteTarget(need(parts.mlp, "mlp", "MLP", index), "output")
        if kind == "resid_mid":
            attn(), need(parts.mlp, "mlp", "MLP", index)
            return SiteTarget(parts.block, kind, 1, explicit_block(parts), BLOCK_POINTS, "block")
        if kind in ATTENTION_POINTS or kind == "z":
            attn()
            o_proj = need(parts.o_proj, "o_proj", "output projection", index)
            if not parts.n_heads or not parts.head_dim:
                raise AnatomyError(
                    f"layer {index}'s attention ({type(parts.attn).__name__}) declares no head "
                    f"count (n_heads), so its heads cannot be split; use layers.{index}.attn "
                    "instead, or give it with the config key model.anatomy (e.g. "
                    "model.anatomy={n_heads: 8})"
                )
            if kind == "z":
                shape = (parts.n_heads, parts.head_dim)
                if flat:
                    return SiteTarget(o_proj, "input")
                return SiteTarget(
                    o_proj,
                    "input",
                    view=lambda v: v.reshape(*v.shape[:-1], *shape),
                    put=lambda v, s: s.reshape(v.shape),
                )
            if parts.qkv_proj is None:
                need(parts.q_proj, "q_proj", "query projection", index)
            seq_axis = 2 if kind in KEY_AXIS_KINDS else 1
            forward = explicit_attention(parts)
            return SiteTarget(attn(), kind, seq_axis, forward, ATTENTION_POINTS, "attention")
        if kind == "mlp_post":
            return SiteTarget(need(parts.down_proj, "down_proj", "down projection", index), "input")
        if parts.gate_up_proj is not None:  # phi3: [gate | up] in one projection
            view, put = _halves(kind == "mlp_pre", int(parts.d_mlp or 0))
            return SiteTarget(parts.gate_up_proj, "output", view=view, put=put)
        if kind == "mlp_pre" and parts.gated:
            return SiteTarget(parts.gate_proj, "output")
        if kind == "mlp_pre" or parts.gated:  # non-gated W_in, or a gated MLP's up projection
            return SiteTarget(need(parts.up_proj, "up_proj", "input projection", index), "output")
        raise SiteError(
            f"{site}: a non-gated MLP ({type(parts.mlp).__name__}) has no pre_linear; its "
            f"neurons are mlp_pre (W_in x) and mlp_post"
        )
    except AnatomyError as err:
        raise SiteError(str(err)) from err


def site_module(model: Any, site: Site) -> Any:
    """The module instance whose class is swapped for ``site`` (layer index resolved)."""
    return site_target(model, site).module


def head_shape(model: Any, layer: int) -> tuple[int, int]:
    """``(n_heads, head_dim)`` of the attention at (resolved) ``layer``, from the anatomy."""
    site_target(model, Site(layer, "z"))  # a SiteError naming what is missing
    parts = anatomy_of(model).layer(layer)
    return int(parts.n_heads or 0), int(parts.head_dim or 0)  # both known: checked above


def site_width(model: Any, site: Site) -> int | None:
    """Width of the last axis a vector edit at ``site`` acts on: n_heads * head_dim for
    ``z``, d_mlp for the MLP's neurons, vocab for logits, else d_model (None when the model
    does not declare it: checked in the forward). q/k/v/scores/pattern take none."""
    anatomy = anatomy_of(model)
    if site.kind == "z":
        n_heads, head_dim = head_shape(model, site.layer)
        return n_heads * head_dim
    if site.kind in ("mlp_pre", "mlp_pre_linear", "mlp_post"):
        return anatomy.layer(site.layer).d_mlp
    if site.kind == "logits":
        return anatomy.vocab_size
    return anatomy.d_model


def flat_width(model: Any, site: Site) -> int | None:
    """Entries per position of ``site``'s value flattened (q: n_heads * head_dim; k, v:
    n_kv_heads * head_dim); None for scores and patterns (one per key token)."""
    if site.kind in KEY_AXIS_KINDS:
        return None
    if site.kind in ("q", "k", "v"):
        parts = anatomy_of(model).layer(site.layer)
        heads = parts.n_heads if site.kind == "q" else parts.n_kv_heads
        return int(heads or 0) * int(parts.head_dim or 0)
    return site_width(model, site)


def resolve_sites(model: Any, sites: Sequence[Any] | str | Site) -> list[Site]:
    """Parse ``sites``, resolve negative layers, check each exists; sorted in forward order
    and unique."""
    pair = isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[1], int)
    if isinstance(sites, (str, Site)) or pair:
        sites = [sites]
    if not sites:
        raise SiteError(f"no sites selected; pass names such as {EXAMPLES}")
    n_layers = anatomy_of(model).n_layers
    resolved = set()
    for site in map(parse_site, sites):
        (layer,) = resolve_layers([site.layer], n_layers)
        layer = {"embed": 0, "logits": n_layers - 1}.get(site.kind, layer)  # the model's ends
        site = Site(layer, site.kind)
        site_target(model, site)  # raises SiteError naming what exists
        resolved.add(site)
    return sorted(resolved)


@contextmanager
def site_hook(
    model: Any, site: Site, fn: Callable[[mx.array], mx.array], prefix: str, flat: bool = False
) -> Iterator[SiteTarget]:
    """Run ``fn`` on the value of ``site`` in every forward inside; what it returns replaces
    the value (return it unchanged to only record). Yields the site's target."""
    target = site_target(model, site, flat)
    if target.check is not None:
        try:
            verify(anatomy_of(model), site.layer, target.check)
        except AnatomyError as err:
            raise SiteError(str(err)) from err
    hook = fn
    if target.view is not None and target.put is not None:
        view, put = target.view, target.put

        def hook(value: mx.array) -> mx.array:
            seen = view(value)
            new = fn(seen)
            return value if new is seen else put(value, new)

    with hooked(target.module, target.point, hook, prefix, target.explicit, target.inner):
        yield target


@contextmanager
def position_clock(model: Any) -> Iterator[PositionClock]:
    """A :class:`PositionClock` on the model's body (or its first layer) while inside."""
    anatomy = anatomy_of(model)
    body = anatomy.body
    module, cache_arg = (body, 1) if body is not None else (anatomy.layers[0], 2)
    clock = PositionClock(cache_arg)
    with hooked(module, "enter", clock, "Clocked"):
        yield clock
