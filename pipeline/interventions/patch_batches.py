"""Many activation patches, batched as rows of resumed forwards (see :mod:`.resume`).

A :class:`Patch` writes the clean run's value of one site kind at one layer (one head for
``z``) into the corrupted run at chosen positions of each pair. Patches that start at the
same layer share forwards: each forward resumes at that layer, over the positions from the
earliest one patched in it, with one row per (patch, pair). Which patches share a forward is
chosen to minimise the rows x positions computed plus a fixed cost per forward, under a cap
on rows x positions (memory). A patch of positions whose tokens, and every token before them,
are the same in both prompts of every pair changes nothing (causal attention): its metric is
the corrupted run's, without a forward. The forwards run with one BLAS thread
(:data:`BLAS_THREADS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.blas import blas_threads
from mlx_interp.interventions.resume import (
    BaseRun,
    RowEdits,
    n_heads_of,
    n_layers_of,
    record_base,
    resumed_logits,
)

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
FORWARD_COST = 64  # rows x positions a forward's fixed cost is worth, per layer (measured)
MAX_ROW_TOKENS = 4096  # rows x positions in one forward
BLAS_THREADS = 1  # per forward a few rows x positions: one thread beats two (mlx_interp.blas)


@dataclass(frozen=True, eq=False)
class Patch:
    """Clean ``kind`` at ``layer`` written into the corrupted run where ``mask`` (bool
    ``[n_pairs, T]``) is true; ``head`` picks one head of ``z`` (None: all heads)."""

    kind: str
    layer: int
    mask: np.ndarray
    head: int | None = None

    @property
    def start(self) -> int:
        """The layer a forward resumes at: resid_post of layer l is the input of layer l+1."""
        return self.layer + 1 if self.kind == "resid_post" else self.layer


@dataclass
class PairRuns:
    """The clean and corrupted base runs of right-padded pairs ``[n_pairs, T]``."""

    clean: BaseRun
    corrupt: BaseRun
    first_diff: np.ndarray  # [n_pairs]: first position where the two prompts differ


def record_pairs(
    model: Any, clean: mx.array, corrupt: mx.array, last: Sequence[int], kinds: Sequence[str]
) -> PairRuns:
    """Run both prompt sets once (one batch), keeping what ``kinds`` patch from and the
    corrupted run's keys/values."""
    n = clean.shape[0]
    record = {"resid_pre"} | {k for k in kinds if k in ("attn_out", "mlp_out", "z")}
    with blas_threads(BLAS_THREADS):
        both = record_base(model, mx.concatenate([clean, corrupt]), [*last, *last], record, True)
    keys, values, logits = both.keys, both.values, both.logits
    assert keys is not None and values is not None and logits is not None  # keep_kv=True

    def half(rows: slice) -> BaseRun:
        return BaseRun(
            both.tokens[rows],
            list(last),
            [r[rows] for r in both.resid],
            {k: v[rows] for k, v in both.sites.items()},
            [k[rows] for k in keys],
            [v[rows] for v in values],
            logits[rows],
        )

    differs = np.array(clean) != np.array(corrupt)
    first = np.where(differs.any(1), differs.argmax(1), differs.shape[1])
    return PairRuns(half(slice(0, n)), half(slice(n, 2 * n)), first)


def _chunks(firsts: list[int], width: int, n_pairs: int, max_row_tokens: int) -> list[range]:
    """Split patches sorted by first position into forwards: a forward over patches i..j-1
    computes (j - i) * n_pairs rows of ``width - firsts[i]`` positions; minimise the total
    plus FORWARD_COST per forward (dynamic programme), rows x positions capped."""
    n = len(firsts)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            size = (j - i) * n_pairs * (width - firsts[i])
            if size > max_row_tokens and i < j - 1:
                break
            cost = best[i] + size + FORWARD_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append(range(cut[j], j))
        j = cut[j]
    return out[::-1]


def _forward(model: Any, runs: PairRuns, start: int, patches: list[Patch], a: int) -> mx.array:
    """Last-position logits ``[len(patches) * n_pairs, vocab]`` (patch-major) of one forward
    resumed at ``start`` over positions ``>= a``."""
    n_pairs = runs.first_diff.shape[0]
    rows = len(patches) * n_pairs
    pair = mx.array(np.tile(np.arange(n_pairs), len(patches)), dtype=mx.int32)
    masks = {kind: np.zeros((rows, runs.clean.tokens.shape[1] - a), bool) for kind in KINDS}
    heads = None
    for k, patch in enumerate(patches):
        kind = "resid_pre" if patch.kind == "resid_post" else patch.kind
        masks[kind][k * n_pairs : (k + 1) * n_pairs] = patch.mask[:, a:]
        if patch.kind == "z" and patch.head is not None:
            if heads is None:
                heads = np.ones((rows, n_heads_of(model, start)), bool)
            heads[k * n_pairs : (k + 1) * n_pairs] = False
            heads[k * n_pairs : (k + 1) * n_pairs, patch.head] = True
    h = runs.corrupt.resid[start][pair, a:]
    if masks["resid_pre"].any():
        where = mx.array(masks["resid_pre"])[..., None]
        h = mx.where(where, runs.clean.resid[start][pair, a:], h)
    edits = RowEdits()
    for kind in ("attn_out", "mlp_out", "z"):
        if not masks[kind].any():
            continue
        mask = mx.array(masks[kind])
        if kind == "z":
            per_head = np.ones((rows, 1), bool) if heads is None else heads
            mask = mask[..., None] & mx.array(per_head)[:, None, :]
        edits.edits[kind] = (mask, runs.clean.sites[(kind, start)][pair, a:])
    last = [runs.clean.last[int(i)] for i in np.tile(np.arange(n_pairs), len(patches))]
    return resumed_logits(model, runs.corrupt, start, a, pair, h, last, edits)


def run_patches(
    model: Any,
    runs: PairRuns,
    patches: Sequence[Patch],
    metric: Callable[[mx.array], mx.array],
    max_row_tokens: int = MAX_ROW_TOKENS,
    skip_unchanged: bool = True,
) -> np.ndarray:
    """float64 ``[len(patches)]``: ``metric`` (mean over pairs) of each patched run.
    ``skip_unchanged=False`` runs even the patches that cannot change anything."""
    n_layers = n_layers_of(model)
    out = np.full(len(patches), np.nan)
    assert runs.corrupt.logits is not None  # record_base keeps the logits
    corrupted = float(mx.mean(metric(runs.corrupt.logits)))
    by_start: dict[int, list[int]] = {}
    for index, patch in enumerate(patches):
        if patch.kind not in KINDS or not 0 <= patch.start <= n_layers:
            raise ValueError(f"cannot patch {patch.kind} at layer {patch.layer}")
        if patch.kind != "resid_pre" and patch.kind != "resid_post" and patch.start == n_layers:
            raise ValueError(f"no layer {patch.layer} for {patch.kind}")
        noop = all(not row[d:].any() for row, d in zip(patch.mask, runs.first_diff, strict=True))
        if noop and skip_unchanged:
            out[index] = corrupted
        else:
            by_start.setdefault(patch.start, []).append(index)
    with blas_threads(BLAS_THREADS):
        for start, indices in by_start.items():
            _run_start(model, runs, patches, metric, start, indices, max_row_tokens, out)
    return out


def _run_start(
    model: Any,
    runs: PairRuns,
    patches: Sequence[Patch],
    metric: Callable[[mx.array], mx.array],
    start: int,
    indices: list[int],
    max_row_tokens: int,
    out: np.ndarray,
) -> None:
    """Fill ``out[indices]``: the patches resumed at layer ``start``, in forwards chosen by
    :func:`_chunks`."""
    n_pairs, width = runs.clean.tokens.shape
    firsts = {i: int(np.argmax(patches[i].mask.any(0))) for i in indices}
    indices.sort(key=firsts.__getitem__)
    order = [firsts[i] for i in indices]
    for chunk in _chunks(order, width, n_pairs, max_row_tokens):
        chosen = [indices[c] for c in chunk]
        logits = _forward(model, runs, start, [patches[i] for i in chosen], order[chunk[0]])
        rowwise = getattr(metric, "rows", None)  # one call for every row (LogitDiff)
        if rowwise is not None:
            values = rowwise(logits, n_pairs).reshape(len(chosen), n_pairs).mean(axis=1)
        else:
            logits = logits.reshape(len(chosen), n_pairs, -1)
            values = mx.stack([mx.mean(metric(logits[k])) for k in range(len(chosen))])
        out[chosen] = np.array(values.astype(mx.float32), dtype=np.float64)
