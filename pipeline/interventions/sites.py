"""Recording and editing at every site of a model: the sites' public face.

Names (:mod:`~mlx_interp.interventions.site_names`): ``embed``, ``resid_pre``,
``resid_mid``, ``resid_post``, ``q``, ``k``, ``v``, ``attn_scores``, ``pattern``, ``z``,
``attn_out``, ``mlp_pre``, ``mlp_pre_linear``, ``mlp_post``, ``mlp_out``, ``logits``;
TransformerLens's names (``blocks.5.attn.hook_pattern``, ``blocks.5.mlp.hook_post``...) and
the old ones (``layers.8``, ``layers.8.attn``, ``layers.8.mlp``, ``layers.8.attn.heads``)
mean the same sites. Where each lives and how a hook reaches it:
:mod:`~mlx_interp.interventions.site_hooks` (from the model's anatomy, through the
class-swap core: no module is replaced and every class is restored in ``finally``).

:func:`capture_sites` records values in every forward inside; :func:`capture_sites_batch`
records one right-padded batch reduced to positions; edits are
:func:`~mlx_interp.interventions.edits.steer_sites` (vector + mode) and
:func:`~mlx_interp.interventions.edits.edit_sites` (any function of the value).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.capture import POSITIONS, padded_batch, reduce_positions
from mlx_interp.interventions.classswap import Recorder, StopForward, hooked
from mlx_interp.interventions.edits import Edit, SiteEdit, edit_sites, steer_sites
from mlx_interp.interventions.site_hooks import (
    KEY_AXIS_KINDS,
    head_shape,
    resolve_sites,
    site_hook,
    site_module,
    site_width,
)
from mlx_interp.interventions.site_names import (
    KINDS,
    SHORTHAND,
    SITE_KINDS,
    Site,
    SiteError,
    kind_of,
    parse_site,
)
from mlx_interp.models.anatomy import anatomy_of

__all__ = [
    "KINDS",
    "SHORTHAND",
    "SITE_KINDS",
    "Edit",
    "Site",
    "SiteEdit",
    "SiteError",
    "SiteRecorder",
    "capture_sites",
    "capture_sites_batch",
    "edit_sites",
    "head_shape",
    "kind_of",
    "parse_site",
    "resolve_sites",
    "site_module",
    "site_width",
    "steer_sites",
]


class SiteRecorder(Recorder):
    """Values recorded by :func:`capture_sites`.

    Attributes:
        sites: the resolved sites, in forward order.
        outputs: canonical site name -> value in the latest forward (lazy ``mx.array``):
            ``[batch, seq, width]``; ``[batch, seq, heads, head_dim]`` for q, k, v, z;
            ``[batch, heads, query, key]`` for attn_scores and pattern.
    """

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self.outputs: dict[str, mx.array] = {}


def _recording(outputs: dict[str, mx.array], name: str):
    def record(value: mx.array) -> mx.array:
        outputs[name] = value[...]  # a view of its own: the model may add to value in place
        return value

    return record


def _stop(value: Any) -> Any:
    raise StopForward


@contextmanager
def capture_sites(
    model: Any, sites: Sequence[Any] | str | Site, stop_after_last: bool = False
) -> Iterator[SiteRecorder]:
    """Record the values at ``sites`` (names or :class:`Site`) in every forward inside.

    Usage::

        with capture_sites(model, ["layers.2.mlp", "blocks.2.attn.hook_pattern"]) as rec:
            model(tokens)
        rec.outputs["layers.2.attn.pattern"]  # [batch, heads, query, key]

    With ``stop_after_last=True`` the forward stops after the highest selected layer (wrap it
    in ``rec.run(model, tokens)``). Inside an edit of the same site (:func:`steer_sites`,
    :func:`edit_sites`), edited values are recorded.
    """
    selected = resolve_sites(model, sites)
    recorder = SiteRecorder(selected)
    with ExitStack() as stack:
        for site in selected:
            record = _recording(recorder.outputs, site.name)
            stack.enter_context(site_hook(model, site, record, "Capturing"))
        last = selected[-1]
        if stop_after_last and last.kind != "logits":  # after the top layer: skip the rest
            block = anatomy_of(model).layers[last.layer]
            stack.enter_context(hooked(block, "output", _stop, "Capturing"))
        try:
            yield recorder
        except StopForward:
            pass


def seq_first(value: mx.array, kind: str) -> mx.array:
    """A site's value with its token axis second: scores and patterns ``[batch, heads,
    query, key]`` -> ``[batch, query, heads, key]``; others unchanged."""
    return value.transpose(0, 2, 1, 3) if kind in KEY_AXIS_KINDS else value


def capture_sites_batch(
    model: Any,
    sequences: list[list[int]],
    sites: Sequence[Any] | str | Site,
    positions: str = "last",
    pad_id: int = 0,
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Record ``sites`` for one right-padded batch, like ``capture.capture_batch``.

    Returns canonical site name -> ``"last"``/``"mean"``: float32 ``[batch, width]`` (q, k,
    v, z: ``[batch, heads, head_dim]``; scores, pattern: ``[batch, heads, key]`` over the
    batch's padded key width, whose columns past a row's length are masked: 0 in a pattern);
    ``"all"``: list of float32 ``[len_i, ...]`` per sequence (scores, pattern:
    ``[len_i, heads, len_i]``).
    """
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; valid: {', '.join(POSITIONS)}")
    tokens, lengths = padded_batch(sequences, pad_id)
    with capture_sites(model, sites, stop_after_last=True) as recorder:
        recorder.run(model, tokens)
    length_array = mx.array(lengths, dtype=mx.int32)
    reduced = {
        site.name: reduce_positions(
            seq_first(recorder.outputs[site.name], site.kind), length_array, positions
        )
        for site in recorder.sites
    }
    mx.eval(*reduced.values())
    recorder.outputs.clear()
    keyed = {site.name for site in recorder.sites if site.kind in KEY_AXIS_KINDS}
    result: dict[str, np.ndarray | list[np.ndarray]] = {}
    for name, values in reduced.items():
        array = np.array(values, dtype=np.float32)
        if positions == "all":
            result[name] = [
                array[row, :n, ..., :n].copy() if name in keyed else array[row, :n].copy()
                for row, n in enumerate(lengths)
            ]
        else:
            result[name] = array
    return result
