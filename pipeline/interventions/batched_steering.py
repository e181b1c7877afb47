"""Every (prompt, steering setting) pair as a row of batched forwards that run only the
positions the setting edits, continuing the unsteered states of the rest.

Which leading tokens of a prompt keep their unsteered states (``reused_length``):

- ``last``: every prompt token but the last;
- ``object``: the tokens before the object's first token;
- ``suffix``: the prompts' shared prefix;
- ``all``: nothing; the shared prefix is run once per setting (steered) and reused by that
  setting's rows;
- unsteered (no edits): the whole prompt (its logits and keys/values come from the store).

:func:`steer_rows` refuses (:class:`FastPathRefused`, naming why) what it cannot compute
exactly: a model in a class swap, caches other than (sliding-window) KV caches beyond their
window, settings that do not share a mode and layers, an every-layer mode on several named
layers. Callers then run each setting on the plain path (``mlx_interp.analysis.scoring``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.modes import SteeringError, make_mode
from mlx_interp.interventions.positions import POSITIONS, PositionError
from mlx_interp.interventions.prefix import MIN_PREFIX, common_prefix_len
from mlx_interp.interventions.rowcache import cache_refusal, filled_kv, fresh_caches
from mlx_interp.interventions.rows import RowSteering, run_rows
from mlx_interp.interventions.steering import LayerEdit, steer
from mlx_interp.interventions.unsteered import (
    EMPTY,
    STORE,
    PrefixState,
    StateStore,
    assemble,
    prefix_state,
    prompt_states,
    swapped_classes,
)
from mlx_interp.models.anatomy import anatomy_of

CONTEXT_BUDGET = 512 * 2**20  # bytes of assembled keys/values per batch of rows


class FastPathRefused(SteeringError):
    """The batched, state-reusing path cannot compute this exactly; the reason says why."""


@dataclass(frozen=True)
class RowResult:
    """One (prompt, setting) pair: logits float32 ``[vocab]`` at the prompt's last token and
    the greedy token ids (None when no generation was asked)."""

    logits: np.ndarray
    tokens: list[int] | None


def reused_length(
    rule: str, length: int, prefix: int, span: tuple[int, int] | None, steered: bool
) -> int:
    """How many leading tokens of a ``length``-token prompt keep their unsteered states
    under ``rule`` (``prefix``: the shared prefix's length; ``span``: the object's)."""
    if not steered:
        return length
    if rule == "last":
        return length - 1
    if rule == "object":
        if span is None:
            raise PositionError("positions=object needs the object span of every prompt")
        return int(span[0])
    if rule == "suffix":
        return prefix
    if rule == "all":
        return 0
    raise PositionError(f"steer.positions must be one of {POSITIONS}, not {rule!r}")


def _check_settings(model: Any, settings: Sequence[Any], mode: Any) -> list[int]:
    """Validate every setting with :func:`steer` itself; the layers they all edit."""
    layers = None
    for setting in settings:
        with steer(model, list(setting.edits), mode, setting.alpha):
            pass  # steer validates (vectors, centers, alpha, layers) before touching anything
        named = sorted({e.layer % len(anatomy_of(model).layers) for e in setting.edits})
        if len(named) != len(setting.edits):
            raise FastPathRefused("a setting with several edits on one layer")
        if layers is not None and named != layers:
            raise FastPathRefused(f"settings edit different layers ({layers} and {named})")
        layers = named
    return layers or []


def _row_mode(model: Any, settings: Sequence[Any], mode: Any, layers: list[int]) -> RowSteering:
    n = len(anatomy_of(model).layers)
    vectors, centers = {}, {}
    for layer in layers:
        edits = [next(e for e in s.edits if e.layer % n == layer) for s in settings]
        vectors[layer] = np.stack([np.asarray(e.vector, np.float32) for e in edits])
        has = [e.center is not None for e in edits]
        if any(has) and not all(has):
            raise FastPathRefused("some settings have a center and others not")
        centers[layer] = (
            np.stack([np.asarray(e.center, np.float32) for e in edits]) if all(has) else None
        )
    try:
        return RowSteering(mode, vectors, centers, [float(s.alpha) for s in settings])
    except SteeringError as err:
        raise FastPathRefused(str(err)) from err


def _row_batch(columns: int, model: Any, rows_cap: int, layers: int | None = None) -> int:
    """Rows per batch: at most ``rows_cap``, and their assembled keys/values (``columns``
    tokens in ``layers`` layers, float32) within ``CONTEXT_BUDGET``."""
    anatomy = anatomy_of(model)
    layers = anatomy.n_layers if layers is None else layers
    per_token = 2 * layers * (anatomy.n_kv_heads or 1) * (anatomy.head_dim or 1) * 4
    return max(1, min(rows_cap, CONTEXT_BUDGET // max(1, columns * per_token)))


def steer_rows(
    model: Any,
    seqs: Sequence[Sequence[int]],
    pairs: Sequence[tuple[int, int]],
    settings: Sequence[Any],
    mode: Any = "add",
    positions: str = "all",
    spans: Sequence[tuple[int, int]] | None = None,
    max_tokens: int = 0,
    eos: set[int] | frozenset[int] = frozenset(),
    pad_id: int = 0,
    batch_size: int = 16,
    rows_cap: int = 64,
    store: StateStore | None = STORE,
) -> list[RowResult]:
    """Logits at the last prompt token (and ``max_tokens`` greedy ids) of every
    ``(prompt index, setting index)`` pair. ``settings``: objects with ``edits`` (a tuple of
    :class:`~mlx_interp.interventions.steering.LayerEdit`; empty = unsteered) and
    ``alpha``, all steered ones sharing ``mode``, ``positions`` and their layers.
    ``batch_size``: prompts per forward of the unsteered states."""
    swapped = swapped_classes(model)
    if swapped:
        raise FastPathRefused(f"the model is inside a class swap ({', '.join(swapped)})")
    longest = max(len(s) for s in seqs) + max_tokens
    refusal = cache_refusal(model, longest)
    if refusal is not None:
        raise FastPathRefused(refusal)
    if positions not in POSITIONS:
        raise PositionError(f"steer.positions must be one of {POSITIONS}, not {positions!r}")
    steered = [bool(s.edits) for s in settings]
    mode = make_mode(mode) if any(steered) else None
    edited = [s for s, on in zip(settings, steered, strict=True) if on]
    index_of = {id(s): i for i, s in enumerate(edited)}
    layers = _check_settings(model, edited, mode) if edited else []
    row_mode = _row_mode(model, edited, mode, layers) if edited else None
    if positions == "object" and spans is None and any(steered):
        raise PositionError("positions=object needs each prompt's object span")

    used = sorted({p for p, _ in pairs})
    shared = common_prefix_len([seqs[p] for p in used]) if len(used) > 1 else 0
    shared = shared if shared >= MIN_PREFIX else 0
    reuse = {
        (p, s): reused_length(
            positions,
            len(seqs[p]),
            shared,
            None if spans is None else spans[p],
            steered[s],
        )
        for p, s in pairs
    }
    if positions == "object" and any(steered):
        inside = [r for (p, s), r in reuse.items() if steered[s] and r < shared]
        if inside:
            raise PositionError(
                f"an object span starts at token {min(inside)}, inside the {shared}-token "
                "prefix shared by every prompt; the object must be in the question"
            )
    needs_states = sorted({p for (p, s), r in reuse.items() if r > shared or not steered[s]})
    states = dict(
        zip(
            needs_states,
            prompt_states(model, [seqs[p] for p in needs_states], batch_size, pad_id, store),
            strict=True,
        )
    )
    unsteered_prefix = prefix_state(model, seqs[used[0]][:shared], store) if shared else EMPTY

    plan = _Plan(model, seqs, reuse, states, unsteered_prefix, shared, positions, spans)
    results: dict[tuple[int, int], RowResult] = {}
    calm = [(p, s) for p, s in pairs if not steered[s]]
    for group in plan.groups(calm, {}):  # unsteered rows: outside any steering
        results.update(plan.run(group, None, max_tokens, eos, pad_id, rows_cap))
    busy = [(p, s) for p, s in pairs if steered[s]]
    if busy:
        assert row_mode is not None  # busy rows are those of edited settings
        layer_edits = [
            LayerEdit(layer, row_mode.vectors[layer][0], _first(row_mode.centers[layer]))
            for layer in layers
        ]
        with steer(model, layer_edits, row_mode, 1.0):
            own_prefix = {}
            if positions == "all" and shared:
                own_prefix = _steered_prefixes(model, seqs[used[0]][:shared], row_mode)
            row_mode.decode = positions != "object"  # object: no generated token is edited
            setting_of = {s: index_of[id(settings[s])] for _, s in busy}
            first = 0 if row_mode.every_layer else min(layers)
            for group in plan.groups(busy, {s: own_prefix.get(i) for s, i in setting_of.items()}):
                row_mode.select_rows = [setting_of[row.setting] for row in group]
                results.update(plan.run(group, row_mode, max_tokens, eos, pad_id, rows_cap, first))
    return [results[(p, s)] for p, s in pairs]


@dataclass
class _Row:
    """One (prompt, setting) pair: the context it continues and the tokens it runs."""

    prompt: int
    setting: int
    prefix: PrefixState
    prefix_used: int
    own: tuple[mx.array, mx.array] | None
    run: list[int]
    gate: np.ndarray | None  # which run positions are edited (None: all)


class _Plan:
    """Contexts and runs of rows, grouped into batches that share a prefix."""

    def __init__(self, model, seqs, reuse, states, unsteered_prefix, shared, positions, spans):
        self.model, self.seqs, self.reuse, self.states = model, seqs, reuse, states
        self.unsteered_prefix, self.shared = unsteered_prefix, shared
        self.positions, self.spans = positions, spans
        self.n_layers = len(anatomy_of(model).layers)

    def row(self, p: int, s: int, own_prefix: PrefixState | None) -> _Row:
        r = self.reuse[(p, s)]
        if own_prefix is not None:  # positions=all: the setting's steered prefix
            prefix, prefix_used, own = own_prefix, own_prefix.length, None
        elif r > self.shared or p in self.states and r == len(self.seqs[p]):
            state = self.states[p]
            prefix, prefix_used = state.prefix, min(r, state.prefix.length)
            u = r - prefix_used
            own = (state.keys[:, :, :u], state.values[:, :, :u]) if u else None
        else:
            prefix, prefix_used, own = self.unsteered_prefix, r, None
        run = list(self.seqs[p][prefix_used + _own_width(own) :])
        gate = None
        if self.positions == "object" and own_prefix is None and r < len(self.seqs[p]):
            start, end = self.spans[p]
            gate = np.arange(len(run)) < (end - start)
        return _Row(p, s, prefix, prefix_used, own, run, gate)

    def groups(self, pairs, own_prefix: dict[int, PrefixState | None]) -> list[list[_Row]]:
        """Rows grouped by (prefix, its length used, whether they run tokens), each group
        sorted by run and context length."""
        found: dict[tuple, list[_Row]] = {}
        for p, s in pairs:
            row = self.row(p, s, own_prefix.get(s))
            each = own_prefix.get(s) is not None  # rows of several steered prefixes batch
            key = ("own" if each else id(row.prefix), row.prefix_used, bool(row.run))
            found.setdefault(key, []).append(row)
        for group in found.values():
            group.sort(key=lambda row: (len(row.run), _own_width(row.own)))
        return list(found.values())

    def run(self, group, edits, max_tokens, eos, pad_id, rows_cap, first_layer=0) -> dict:
        """Results of a group's rows, in batches of at most ``rows_cap`` rows whose
        assembled keys/values fit ``CONTEXT_BUDGET``. ``first_layer`` > 0: rows that run
        only their last token, with no generation, start at that layer (the first edited
        one) from the residual their unsteered states hold; nothing below it is computed."""
        skip = (
            first_layer > 0
            and max_tokens == 0
            and self.positions == "last"
            and all(len(row.run) == 1 and row.prompt in self.states for row in group)
        )
        first_layer = first_layer if skip else 0
        used = group[0].prefix_used
        cuts = {id(row.prefix): _cut(row.prefix, used) for row in group}
        width = max(len(row.run) for row in group)
        columns = used + max(_own_width(row.own) for row in group) + width + max_tokens
        step = _row_batch(columns, self.model, rows_cap, self.n_layers - first_layer)
        out = {}
        for start in range(0, len(group), step):
            batch = group[start : start + step]
            owns = [row.own for row in batch]
            runs = [row.run for row in batch]
            extra = max(len(r) for r in runs) + max_tokens
            if used or any(o is not None for o in owns):
                prefixes = [cuts[id(row.prefix)] for row in batch]
                caches = assemble(prefixes, owns, extra, self.n_layers, first_layer)
            else:
                caches = fresh_caches(self.n_layers, len(batch), extra)
            gate = None
            if edits is not None:
                edits.select(edits.select_rows[start : start + step])
                gate = np.zeros((len(batch), max(len(r) for r in runs)), bool)
                for b, row in enumerate(batch):
                    gate[b, : len(row.run)] = True if row.gate is None else row.gate
            first, entry = None, None
            if not batch[0].run:
                first = mx.stack([self.states[row.prompt].logits for row in batch])
            if first_layer:
                entering = [self.states[row.prompt].last[first_layer - 1] for row in batch]
                entry = (first_layer, mx.stack(entering)[:, None, :])
            done = run_rows(
                self.model, caches, runs, first, edits, gate, max_tokens, eos, pad_id, entry
            )
            for b, row in enumerate(batch):
                tokens = None if done.tokens is None else done.tokens[b]
                out[(row.prompt, row.setting)] = RowResult(done.logits[b], tokens)
        return out


def _own_width(own: tuple[mx.array, mx.array] | None) -> int:
    return 0 if own is None else int(own[0].shape[2])


def _first(centers: np.ndarray | None) -> np.ndarray | None:
    return None if centers is None else centers[0]


def _cut(prefix: PrefixState, length: int) -> PrefixState:
    """``prefix`` shortened to its first ``length`` tokens (the same object when whole)."""
    if length == prefix.length:
        return prefix
    kv = [(k[:, :, :length], v[:, :, :length]) for k, v in prefix.kv]
    return PrefixState(prefix.tokens[:length], kv)


def _steered_prefixes(model: Any, tokens: Sequence[int], row_mode: RowSteering):
    """Each setting's own prefix states (``positions=all``: the prefix is edited too), as
    rows of one forward."""
    n = len(row_mode.alphas)
    caches = fresh_caches(len(anatomy_of(model).layers), n, len(tokens))
    row_mode.select(list(range(n)))
    row_mode.gate = mx.ones((n, len(tokens)), dtype=mx.bool_)
    try:
        anatomy_of(model).body(mx.array([list(tokens)] * n, dtype=mx.int32), cache=caches)
    finally:
        row_mode.gate = None
    out = {}
    for s in range(n):
        kv = [
            (mx.contiguous(k[s : s + 1]), mx.contiguous(v[s : s + 1]))
            for k, v in (filled_kv(c) for c in caches)
        ]
        out[s] = PrefixState(tuple(int(t) for t in tokens), kv)
    mx.eval([pair for state in out.values() for pair in state.kv])
    return out
