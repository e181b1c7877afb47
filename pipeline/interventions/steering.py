"""Steering of the residual stream of mlx-lm models, without forward hooks.

:func:`steer` edits the output ``[batch, seq, d_model]`` of chosen decoder layers at every
position: it is the residual-stream case of the site edits
(:func:`~mlx_interp.interventions.edits.steer_sites`), which swap the class of the layer
for a one-off subclass through the class-swap core and restore it on exit, also when the
body raises. The edit therefore applies in any forward: mlx-lm's own generate loop with its
KV cache, or a plain ``model(tokens)``.

Modes (:mod:`mlx_interp.interventions.modes`, re-exported here) are small classes chosen by
name or by Hydra ``_target_``; each maps ``(h [batch, seq, d_model], vector [d_model],
center [d_model] | None, alpha) -> h'`` and keeps the arithmetic in ``h``'s dtype. A mode
with ``every_layer`` is applied after every decoder layer; a mode with ``for_layer`` is
bound to each layer it edits before any layer is touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_interp.interventions.edits import SiteEdit, steer_sites
from mlx_interp.interventions.modes import (
    MODES,
    PLAIN_MODES,
    AblateAllLayersMode,
    AblateMode,
    AddMode,
    ConditionalMode,
    NormPreservingMode,
    ReflectMode,
    SteeringError,
    SteeringMode,
    SubtractMode,
    make_mode,
)
from mlx_interp.interventions.prefix import batched_last_logits, greedy_generate
from mlx_interp.interventions.site_names import Site

__all__ = [
    "MODES",
    "PLAIN_MODES",
    "AblateAllLayersMode",
    "AblateMode",
    "AddMode",
    "ConditionalMode",
    "LayerEdit",
    "NormPreservingMode",
    "ReflectMode",
    "SteeringError",
    "SteeringMode",
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


@contextmanager
def steer(model: Any, edits: Sequence[LayerEdit], mode: Any, alpha: float) -> Iterator[None]:
    """Edit the residual stream at the layers named by ``edits`` in every forward inside.

    The residual case of :func:`~mlx_interp.interventions.edits.steer_sites`: each edit is a
    ``SiteEdit`` at ``resid_post`` of its layer (validation, grouping, ``every_layer`` /
    ``for_layer`` and the class swap are that function's). ``mode`` is a name from
    :data:`MODES`, a ``_target_`` config or a mode object. Several edits on one layer apply
    in order; an ``every_layer`` mode applies each edit after every decoder layer. Empty
    ``edits`` makes this a no-op. Raises :class:`SteeringError` (non-finite alpha,
    zero/non-finite vector, wrong d_model, missing center) or
    :class:`~mlx_interp.interventions.capture.LayerIndexError` (layer out of range) before
    any layer is touched.
    """
    site_edits = []
    for index, edit in enumerate(edits):
        if not isinstance(edit, LayerEdit):
            raise SteeringError(f"edit {index} is a {type(edit).__name__}, not a LayerEdit")
        if isinstance(edit.layer, bool) or not isinstance(edit.layer, (int, np.integer)):
            raise TypeError(f"layer indices must be ints, got {edit.layer!r}")
        site_edits.append(SiteEdit(Site(int(edit.layer), "resid_post"), edit.vector, edit.center))
    with steer_sites(model, site_edits, mode, alpha, _kind="LayerEdit"):
        yield


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
