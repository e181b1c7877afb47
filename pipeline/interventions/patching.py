"""Activation patching: how much of a clean-vs-corrupted metric one site carries.

Clean prompts and corrupted ones (same template, same token count per pair) are run once
each; then the corrupted run again with one site's value, at chosen positions, replaced by
the clean run's. The share recovered is ``(M_patched - M_corrupted) / (M_clean -
M_corrupted)``: 1 = the site carries the whole difference, 0 = none of it; ``M`` is a
metric of the last position's logits averaged over the pairs (default: the logit
difference of two answer tokens).

- :func:`patching_heatmap` / :func:`patching_heatmaps`: every layer x position (x head for
  ``z``), like TransformerLens's ``get_act_patch_resid_pre`` and
  ``get_act_patch_attn_head_out_by_pos``, but normalised;
- :func:`patching_recovery`: by position role (object, after, last, all) per layer, for the
  localize stage;
- :func:`patch_site`: a context manager that writes given values into one site.

Site kinds: ``resid_pre`` (a layer's input), ``resid_post`` (its output), ``attn_out`` and
``mlp_out`` (the blocks' outputs before the residual add), ``z`` (per-head attention outputs,
the output projection's input); the old names ``resid``, ``attn``, ``mlp``, ``heads`` mean
``resid_post``, ``attn_out``, ``mlp_out``, ``z``. The patched forwards are batched and resume
at the patched layer and position (:mod:`.patch_batches`), equal to full forwards (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.engine.schema import PATCH_KINDS
from mlx_interp.interventions.capture import padded_batch, resolve_layers
from mlx_interp.interventions.classswap import swapped
from mlx_interp.interventions.modes import SteeringError
from mlx_interp.interventions.patch_batches import KINDS, Patch, record_pairs, run_patches
from mlx_interp.interventions.positions import ROLES, role_positions
from mlx_interp.interventions.resume import n_heads_of, n_layers_of
from mlx_interp.interventions.sites import Site, site_module

PATCH_ROLES = (*ROLES, "all")
ALIASES = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out", "heads": "z"}

__all__ = [
    "PATCH_ROLES",
    "PatchingError",
    "PatchingResult",
    "logit_diff",
    "patch_site",
    "patching_heatmap",
    "patching_heatmaps",
    "patching_recovery",
]


class PatchingError(SteeringError):
    """Pairs that cannot be patched position by position, or a metric with nothing to
    recover."""


def kind_name(kind: str) -> str:
    """``resid``/``attn``/``mlp``/``heads`` -> their TransformerLens names; check the rest."""
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise PatchingError(f"cannot patch site kind {kind!r}; use one of {KINDS}")
    return kind


@contextmanager
def patch_site(model: Any, site: Site, mask: mx.array, values: mx.array) -> Iterator[None]:
    """Inside, ``site``'s output ``[batch, seq, d_model]`` takes ``values`` where ``mask``
    [batch, seq] is true (forwards of another shape are left alone)."""
    if site.kind not in {Site(0, kind).kind for kind in PATCH_KINDS}:  # resid = resid_post...
        raise PatchingError(f"cannot patch site kind {site.kind!r}; use one of {PATCH_KINDS}")
    module = site_module(model, site)
    original = type(module)
    original_call = original.__call__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = original_call(self, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if tuple(h.shape[:2]) == tuple(mask.shape):
            h = mx.where(mask[..., None], values.astype(h.dtype), h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with swapped(module, "Patching", __call__):
        yield


class LogitDiff:
    """Metric: logit of ``plus`` minus logit of ``minus`` per pair, ``[n_pairs]``. Each is a
    token id, a list of ids (one per pair), or per pair a list of ids (the max over them:
    several spellings of one word)."""

    def __init__(self, plus: Any, minus: Any) -> None:
        self.plus, self.minus = self._table(plus), self._table(minus)

    @staticmethod
    def _table(ids: Any) -> np.ndarray:
        """int ``[n_pairs or 1, k]``: each pair's ids, padded by repeating its first one."""
        if isinstance(ids, (int, np.integer)):
            return np.array([[int(ids)]])
        rows = [[int(i)] if isinstance(i, (int, np.integer)) else [int(t) for t in i] for i in ids]
        if not rows or not all(rows):
            raise PatchingError("answer ids: an int, or one id (or list of ids) per pair")
        width = max(len(r) for r in rows)
        return np.array([r + [r[0]] * (width - len(r)) for r in rows])

    def _pick(self, logits: mx.array, table: np.ndarray, n_pairs: int) -> mx.array:
        if len(table) not in (1, n_pairs):
            raise PatchingError(f"{len(table)} answer ids for {n_pairs} pairs")
        index = np.tile(table, (logits.shape[0] // len(table), 1))  # [rows, k]
        return mx.take_along_axis(logits, mx.array(index), axis=1).max(axis=1)

    def rows(self, logits: mx.array, n_pairs: int) -> mx.array:
        """``[rows]`` for logits ``[k * n_pairs, vocab]`` whose rows cycle through the pairs."""
        logits = logits.astype(mx.float32)
        return self._pick(logits, self.plus, n_pairs) - self._pick(logits, self.minus, n_pairs)

    def __call__(self, logits: mx.array) -> mx.array:
        return self.rows(logits, logits.shape[0])


def logit_diff(plus: Any, minus: Any) -> LogitDiff:
    """The default metric, :class:`LogitDiff` of ``plus`` over ``minus``."""
    return LogitDiff(plus, minus)


def _unwrap(model: Any) -> tuple[Any, Any]:
    """(mlx-lm module, tokenizer or None) of an mlx-lm model or an ``mlx_interp.Model``."""
    if hasattr(model, "tokens") and hasattr(model, "tokenizer") and hasattr(model, "model"):
        return model.model, model
    return model, None


def token_rows(model: Any, prompts: Any, what: str) -> tuple[Any, list[list[int]]]:
    """(mlx-lm module, token id lists) of ``prompts``: ids (one list or ``[n, seq]``), or
    strings tokenized by an ``mlx_interp.Model``."""
    module, wrapper = _unwrap(model)
    return module, _token_rows(prompts, wrapper, what)


def _token_rows(prompts: Any, wrapper: Any, what: str) -> list[list[int]]:
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)
    ):
        if wrapper is None:
            raise PatchingError(f"{what} are strings: pass an mlx_interp.Model, or token ids")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return [wrapper.tokens(p) for p in prompts]
    if isinstance(prompts, mx.array):
        prompts = np.array(prompts)
    rows = [prompts] if len(prompts) and np.ndim(prompts[0]) == 0 else list(prompts)
    if not rows or not all(len(r) and np.issubdtype(np.asarray(r).dtype, np.integer) for r in rows):
        raise PatchingError(f"{what}: token ids [n, seq] (or strings with an mlx_interp.Model)")
    return [[int(t) for t in r] for r in rows]


def _answer_ids(answer: Any, wrapper: Any) -> Any:
    if isinstance(answer, str):
        if wrapper is None:
            raise PatchingError("answers are strings: pass an mlx_interp.Model, or token ids")
        ids = wrapper.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise PatchingError(
                f"answer {answer!r} is {len(ids)} tokens; the logit difference needs one token "
                "each (e.g. ' John' with its space), or pass token ids"
            )
        return ids[0]
    return answer


@dataclass(frozen=True)
class PreparedPairs:
    """Prompt pairs checked for a heatmap: the mlx-lm ``module``, token ids ``clean`` and
    ``corrupt`` ``[n_pairs, seq]`` and the ``metric``."""

    module: Any
    clean: mx.array
    corrupt: mx.array
    metric: Callable[[mx.array], mx.array]


def prepare_pairs(
    model: Any, clean: Any, corrupted: Any, answers: Any, metric: Any
) -> PreparedPairs:
    """Token ids of equal length and the metric (``answers`` -> :func:`logit_diff`)."""
    module, wrapper = _unwrap(model)
    clean_rows = _token_rows(clean, wrapper, "clean prompts")
    corrupt_rows = _token_rows(corrupted, wrapper, "corrupted prompts")
    lengths = {len(r) for r in clean_rows + corrupt_rows}
    if len(clean_rows) != len(corrupt_rows) or len(lengths) != 1:
        raise PatchingError(
            f"{len(clean_rows)} clean and {len(corrupt_rows)} corrupted prompts of lengths "
            f"{sorted(lengths)}: a heatmap by position needs pairs of one length (pad or pick "
            "prompts whose differing words are one token each)"
        )
    if metric is None:
        if answers is None:
            raise PatchingError("pass answers=(plus, minus) for a logit difference, or a metric")
        metric = logit_diff(*(_answer_ids(a, wrapper) for a in answers))
    return PreparedPairs(module, mx.array(clean_rows), mx.array(corrupt_rows), metric)


@dataclass(frozen=True)
class PatchingResult:
    """A patching heatmap of one site kind.

    ``recovery``: float ``[n_layers, n_positions]`` (``z``: ``[n_layers, n_positions,
    n_heads]``), 0 = the corrupted metric, 1 = the clean one; ``metric``: the patched metric
    itself, same shape; ``clean_metric``/``corrupted_metric``: the unpatched ones (means over
    pairs); ``layers``/``positions``: what the axes hold."""

    kind: str
    recovery: np.ndarray
    metric: np.ndarray
    clean_metric: float
    corrupted_metric: float
    layers: list[int]
    positions: list[int]


def patching_heatmaps(
    model: Any,
    clean: Any,
    corrupted: Any,
    kinds: Sequence[str] = ("resid_pre",),
    answers: tuple[Any, Any] | None = None,
    metric: Callable[[mx.array], mx.array] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    skip_unchanged: bool = True,
) -> dict[str, PatchingResult]:
    """Patch each kind at every layer x position (x head for ``z``); one result per kind.

    ``clean``/``corrupted``: token ids ``[n_pairs, seq]`` (or one list), or strings with an
    ``mlx_interp.Model``; every prompt of the same length. ``answers=(plus, minus)`` sets the
    default metric :func:`logit_diff` (ids or single-token strings); or pass ``metric``, a
    function of the last position's logits ``[n_pairs, vocab]`` -> ``[n_pairs]`` or a scalar
    (averaged). ``layers``/``positions``: subsets (negative ok); default all. Positions before
    the first token where a pair differs cannot change anything (causal attention): they get
    the corrupted metric without a forward unless ``skip_unchanged=False``."""
    pairs = prepare_pairs(model, clean, corrupted, answers, metric)
    module, metric = pairs.module, pairs.metric
    kinds = [kind_name(k) for k in kinds]
    width = pairs.clean.shape[1]
    n_layers = n_layers_of(module)
    layers = resolve_layers(layers, n_layers)
    positions = sorted({int(p) % width for p in (range(width) if positions is None else positions)})
    n_pairs = pairs.clean.shape[0]
    runs = record_pairs(module, pairs.clean, pairs.corrupt, [width - 1] * n_pairs, kinds)
    assert runs.clean.logits is not None and runs.corrupt.logits is not None  # record_base
    m_clean = float(mx.mean(metric(runs.clean.logits)))
    m_corrupt = float(mx.mean(metric(runs.corrupt.logits)))
    gap = metric_gap(m_clean, m_corrupt)
    patches, shapes = [], {}
    for kind in kinds:  # all kinds in one call: those starting at one layer share forwards
        heads = range(n_heads_of(module, layers[0])) if kind == "z" else [None]
        shapes[kind] = (len(layers), len(positions), len(heads))
        for layer in layers:
            for p in positions:
                mask = np.zeros((n_pairs, width), bool)
                mask[:, p] = True
                patches += [Patch(kind, layer, mask, h) for h in heads]
    values = run_patches(module, runs, patches, metric, skip_unchanged=skip_unchanged)
    results, done = {}, 0
    for kind, shape in shapes.items():
        part = values[done : done + int(np.prod(shape))].reshape(shape)
        done += part.size
        part = part if kind == "z" else part[..., 0]
        results[kind] = PatchingResult(
            kind, (part - m_corrupt) / gap, part, m_clean, m_corrupt, layers, positions
        )
    return results


def metric_gap(m_clean: float, m_corrupt: float) -> float:
    """``m_clean - m_corrupt``, the denominator of every recovery; refused when 0."""
    gap = m_clean - m_corrupt
    if not np.isfinite(gap) or gap == 0:
        raise PatchingError(
            f"the metric is {m_clean} on the clean prompts and {m_corrupt} on the corrupted "
            "ones: nothing to recover (pick prompts or answers on which they differ)"
        )
    return gap


def patching_heatmap(model: Any, clean: Any, corrupted: Any, kind: str = "resid_pre", **kw):
    """One kind's :class:`PatchingResult` (see :func:`patching_heatmaps` for the arguments)."""
    return patching_heatmaps(model, clean, corrupted, (kind,), **kw)[kind_name(kind)]


def patching_recovery(
    model: Any,
    clean: Sequence[Sequence[int]],
    corrupt: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    plus_ids: Sequence[Sequence[int]],
    minus_ids: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    pad_id: int = 0,
    roles: Sequence[str] = PATCH_ROLES,
    kinds: Sequence[str] = ("resid",),
) -> dict[str, Any]:
    """Share recovered per (layer, role): ``recovery`` float ``[len(layers), len(roles)]``,
    plus ``ld_clean``/``ld_corrupt`` per pair [n]. ``spans`` is the object span of each pair
    (the same in both prompts); ``plus_ids``/``minus_ids`` the clean/corrupted word's ids;
    ``roles`` a subset of :data:`PATCH_ROLES` (``all`` recovers 1 by construction: a check);
    ``kinds`` the sites patched (:data:`PATCH_KINDS`, or the TransformerLens kinds):
    ``by_kind`` holds each one's array, and ``recovery`` the first kind's. Pairs may differ
    in length from each other (right-padded); the two prompts of a pair may not."""
    if not kinds or any(ALIASES.get(k, k) not in KINDS for k in kinds):
        raise PatchingError(f"patching kinds must be a non-empty subset of {PATCH_KINDS}")
    unknown = [r for r in roles if r not in PATCH_ROLES]
    if unknown:
        raise PatchingError(f"unknown patching role(s) {unknown}; use {PATCH_ROLES}")
    clean = [[int(t) for t in s] for s in clean]
    corrupt = [[int(t) for t in s] for s in corrupt]
    for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)):
        if len(a) != len(b):
            raise PatchingError(
                f"pair {i}: clean has {len(a)} tokens, corrupted {len(b)}; patching by position "
                "needs pairs of one template with objects of equal token count"
            )
    layers = list(range(n_layers_of(model))) if layers is None else [int(x) for x in layers]
    clean_tokens, lengths = padded_batch(clean, pad_id)
    corrupt_tokens, _ = padded_batch(corrupt, pad_id)
    last = [n - 1 for n in lengths]
    metric = logit_diff(plus_ids, minus_ids)
    runs = record_pairs(model, clean_tokens, corrupt_tokens, last, [kind_name(k) for k in kinds])
    assert runs.clean.logits is not None and runs.corrupt.logits is not None  # record_base
    ld_clean = np.array(metric(runs.clean.logits), dtype=np.float64)
    ld_corrupt = np.array(metric(runs.corrupt.logits), dtype=np.float64)
    gap = float(ld_clean.mean() - ld_corrupt.mean())
    masks = {}
    for role in roles:
        m = np.zeros(clean_tokens.shape, bool)
        for i, n in enumerate(lengths):
            m[i, range(n) if role == "all" else role_positions(spans[i], n)[role]] = True
        masks[role] = m
    by_kind = {}
    for kind in kinds:
        patches = [Patch(kind_name(kind), layer, masks[r]) for layer in layers for r in roles]
        values = run_patches(model, runs, patches, metric).reshape(len(layers), len(roles))
        by_kind[kind] = (values - ld_corrupt.mean()) / gap if gap else np.full_like(values, np.nan)
    return {
        "layers": layers,
        "roles": list(roles),
        "recovery": by_kind[kinds[0]],
        "by_kind": by_kind,
        "ld_clean": ld_clean,
        "ld_corrupt": ld_corrupt,
    }
