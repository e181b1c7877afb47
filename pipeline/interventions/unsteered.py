"""Unsteered keys/values of prompts, computed once and reused by every steering setting.

A steering setting that edits some positions leaves every earlier position's states as the
unsteered model computed them (causal attention). So the keys/values of each prompt are
computed once, unsteered, and every setting (main and random directions, sweep points,
generation) continues from them, running only the positions it edits.

Memory: the prompts' shared prefix (system prompt, few-shot turns) is held once
(:class:`PrefixState`), each prompt's own tokens after it separately (:class:`PromptState`,
keys and values ``[layers, kv_heads, own tokens, head_dim]`` and the logits at its last
token). States live in a process-wide store (:data:`STORE`), keyed by the model object and
the token ids, bounded in bytes (``MLX_INTERP_STATES_MB``, default 1024; least recently used
first out), so the baseline and steer stages and the jobs of a sweep run in one process
share them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_interp.errors import MlxInterpError
from mlx_interp.interventions.capture import capture_layers
from mlx_interp.interventions.prefix import MIN_PREFIX, common_prefix_len, last_logits
from mlx_interp.interventions.rowcache import RowKV, filled_kv, fresh_caches, row_caches
from mlx_interp.models.anatomy import anatomy_of

log = logging.getLogger(__name__)

BUDGET_ENV = "MLX_INTERP_STATES_MB"


@dataclass(eq=False)
class PrefixState:
    """Keys/values of a prefix every row of a batch starts with: per layer ``(keys, values)``
    ``[1, kv_heads, length, head_dim]`` (no layers for the empty prefix)."""

    tokens: tuple[int, ...]
    kv: list[tuple[mx.array, mx.array]]

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


@dataclass(eq=False)
class PromptState:
    """One prompt's unsteered states after its prefix: ``keys``/``values`` ``[layers,
    kv_heads, own, head_dim]`` for its ``own = len(tokens) - prefix.length`` tokens,
    ``logits`` float32 ``[vocab]`` at its last token and ``last`` ``[layers, d_model]``, the
    residual leaving each layer at its last token (a row editing only that token from layer
    k on starts there)."""

    tokens: tuple[int, ...]
    prefix: PrefixState
    keys: mx.array
    values: mx.array
    logits: mx.array
    last: mx.array

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.logits.nbytes + self.last.nbytes


def swapped_classes(model: Any) -> list[str]:
    """Names of the model's modules whose class is a one-off class swap (steering, capture,
    head selection in progress): states computed then would not be the unsteered ones."""
    anatomy = anatomy_of(model)
    found = []
    for module in [model, anatomy.body, *anatomy.layers]:
        cls = type(module)
        if getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is not cls:
            found.append(cls.__name__)
    return found


class StateStore:
    """Prompt and prefix states by (model, token ids), least recently used first out when
    their bytes pass ``budget``; a model's entries go when the model is garbage-collected."""

    def __init__(self, budget_bytes: int | None = None):
        mb = float(os.environ.get(BUDGET_ENV, "1024"))
        self.budget = int(budget_bytes if budget_bytes is not None else mb * 2**20)
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.nbytes = 0
        self.models: set[int] = set()

    def _key(self, model: Any, kind: str, tokens: Sequence[int]) -> tuple:
        if id(model) not in self.models:
            self.models.add(id(model))
            weakref.finalize(model, self.drop_model, id(model))
        return (id(model), kind, tuple(int(t) for t in tokens))

    def get(self, model: Any, kind: str, tokens: Sequence[int]) -> Any | None:
        key = self._key(model, kind, tokens)
        state = self.entries.get(key)
        if state is not None:
            self.entries.move_to_end(key)
        return state

    def put(self, model: Any, kind: str, state: Any) -> None:
        key = self._key(model, kind, state.tokens)
        if key in self.entries:
            return
        if state.nbytes > self.budget:
            return
        self.entries[key] = state
        self.nbytes += state.nbytes
        while self.nbytes > self.budget and self._evict_one():
            pass

    def _evict_one(self) -> bool:
        """Drop the least recently used prompt state, and its prefix once no stored prompt
        continues it (a prefix is held while its prompts are); False if none is left."""
        oldest = next((k for k in self.entries if k[1] == "prompt"), None)
        if oldest is None:
            oldest = next(iter(self.entries), None)
            if oldest is None:
                return False
        state = self.entries.pop(oldest)
        self.nbytes -= state.nbytes
        prefix = getattr(state, "prefix", None)
        if prefix is not None and prefix.tokens:
            users = any(getattr(s, "prefix", None) is prefix for s in self.entries.values())
            key = (oldest[0], "prefix", prefix.tokens)
            if not users and self.entries.get(key) is prefix:
                self.nbytes -= self.entries.pop(key).nbytes
        return True

    def drop_model(self, model_id: int) -> None:
        for key in [k for k in self.entries if k[0] == model_id]:
            self.nbytes -= self.entries.pop(key).nbytes
        self.models.discard(model_id)

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


STORE = StateStore()
EMPTY = PrefixState((), [])


def _body(model: Any) -> Any:
    return anatomy_of(model).body


def prefix_state(model: Any, tokens: Sequence[int], store: StateStore | None = STORE):
    """The unsteered :class:`PrefixState` of ``tokens`` (from the store, or run now)."""
    if not tokens:
        return EMPTY
    if store is not None and (known := store.get(model, "prefix", tokens)) is not None:
        return known
    caches = fresh_caches(len(anatomy_of(model).layers), 1, len(tokens))
    _body(model)(mx.array([list(tokens)], dtype=mx.int32), cache=caches)
    kv = [(mx.contiguous(k), mx.contiguous(v)) for k, v in map(filled_kv, caches)]
    mx.eval(kv)
    state = PrefixState(tuple(int(t) for t in tokens), kv)
    if store is not None:
        store.put(model, "prefix", state)
    return state


def assemble(
    prefixes: Sequence[PrefixState],
    owns: Sequence[tuple[mx.array, mx.array] | None],
    extra: int,
    n_layers: int,
    from_layer: int = 0,
) -> list[RowKV]:
    """Per-layer :class:`RowKV` caches for a batch: row b continues ``prefixes[b]`` (all of
    one length) and then ``owns[b]`` (keys, values ``[layers, kv_heads, u_b, head_dim]`` or
    None), with room for ``extra`` more columns. Layers below ``from_layer`` get empty
    caches (a forward that starts at ``from_layer`` never reads them)."""
    length = prefixes[0].length
    if any(p.length != length for p in prefixes):
        raise ValueError("rows of one batch must share the prefix length")
    used = [0 if o is None else int(o[0].shape[2]) for o in owns]
    width = max(used)
    batch = len(owns)
    columns = length + width + extra
    positions = np.full((batch, columns), -1, np.int32)
    positions[:, :length] = np.arange(length)
    for b, u in enumerate(used):
        positions[b, length : length + u] = np.arange(length, length + u)
    shared = all(p is prefixes[0] for p in prefixes)
    layers: list[tuple[Any, Any]] = []  # (None, None) below from_layer
    own_stack = None
    if width:
        like = next(o for o in owns if o is not None)
        parts = []
        for kind in (0, 1):
            rows = []
            for own, u in zip(owns, used, strict=True):
                shape = (*like[kind].shape[:2], width, like[kind].shape[3])
                if own is None:
                    rows.append(mx.zeros(shape, like[kind].dtype))
                else:
                    pad = [(0, 0), (0, 0), (0, width - u), (0, 0)]
                    rows.append(mx.pad(own[kind], pad) if u < width else own[kind])
            parts.append(mx.stack(rows, axis=1))  # [layers, batch, kv_heads, width, hd]
        own_stack = parts
    for index in range(n_layers):
        if index < from_layer:
            layers.append((None, None))
            continue
        pair = []
        for kind in (0, 1):
            pieces = []
            if length:
                if shared:
                    p = prefixes[0].kv[index][kind]
                    pieces.append(mx.broadcast_to(p, (batch, *p.shape[1:])))
                else:
                    pieces.append(mx.concatenate([p.kv[index][kind] for p in prefixes], axis=0))
            if own_stack is not None:
                pieces.append(own_stack[kind][index])
            ref = pieces[0] if pieces else None
            if ref is None:
                raise ValueError("a batch with neither prefix nor own states needs no assembly")
            pieces.append(mx.zeros((batch, ref.shape[1], extra, ref.shape[3]), ref.dtype))
            pair.append(mx.concatenate(pieces, axis=2))
        layers.append((pair[0], pair[1]))
    return row_caches(layers, positions, length + width, [length + u for u in used])


def _right_padded(runs: Sequence[Sequence[int]], pad_id: int) -> tuple[mx.array, list[int]]:
    lengths = [len(r) for r in runs]
    width = max(lengths)
    rows = [list(r) + [pad_id] * (width - len(r)) for r in runs]
    return mx.array(rows, dtype=mx.int32), lengths


def prompt_states(
    model: Any,
    seqs: Sequence[Sequence[int]],
    batch_size: int = 16,
    pad_id: int = 0,
    store: StateStore | None = STORE,
) -> list[PromptState]:
    """The unsteered :class:`PromptState` of every sequence: from the store, else computed
    now (the missing ones' shared prefix once, then their own tokens ``batch_size`` at a
    time, LM head at the last token only) and stored."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    found: list[PromptState | None] = [
        store.get(model, "prompt", s) if store is not None else None for s in seqs
    ]
    missing = [i for i, state in enumerate(found) if state is None]
    if missing:
        todo = [list(seqs[i]) for i in missing]
        p = common_prefix_len(todo) if len(todo) > 1 else 0
        prefix = prefix_state(model, todo[0][:p], store) if p >= MIN_PREFIX else EMPTY
        p = prefix.length
        order = sorted(range(len(todo)), key=lambda j: len(todo[j]))
        n_layers = len(anatomy_of(model).layers)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            runs = [todo[j][p:] for j in rows]
            tokens, lengths = _right_padded(runs, pad_id)
            if p:
                caches = assemble(
                    [prefix] * len(rows), [None] * len(rows), tokens.shape[1], n_layers
                )
            else:
                caches = fresh_caches(n_layers, len(rows), tokens.shape[1])
            with capture_layers(model) as recorder:
                logits = last_logits(model, tokens, [n - 1 for n in lengths], caches)
            at = mx.array([n - 1 for n in lengths], dtype=mx.int32)
            rows_at = mx.arange(len(rows))
            last = mx.stack([recorder.outputs[i][rows_at, at] for i in range(n_layers)], axis=1)
            recorder.outputs.clear()
            logits = logits.astype(mx.float32)
            filled = caches[0].context.filled
            made = []
            kv = [filled_kv(c) for c in caches]
            for b, (j, n) in enumerate(zip(rows, lengths, strict=True)):
                keys = mx.stack([k[b, :, filled : filled + n] for k, _ in kv])
                values = mx.stack([v[b, :, filled : filled + n] for _, v in kv])
                state = PromptState(tuple(todo[j]), prefix, keys, values, logits[b], last[b])
                made.append(state)
            mx.eval([(s.keys, s.values, s.logits, s.last) for s in made])
            for j, state in zip(rows, made, strict=True):
                found[missing[j]] = state
                if store is not None:
                    store.put(model, "prompt", state)
    return found  # type: ignore[return-value]


# --- states on disk: the baseline stage writes them, a steer stage in another process reads


STATES_FORMAT = "mlx-interp unsteered states 1"


class StateFileError(MlxInterpError, ValueError):
    """A file of unsteered states that does not fit the model it is read for."""


def save_states(
    path: Path, model: Any, seqs: Sequence[Sequence[int]], store: StateStore = STORE
) -> int:
    """Write the stored unsteered states of ``seqs`` (those the store holds, each once, in
    first-seen order) and their prefixes to ``path`` (safetensors); their bytes (0: nothing
    written, the store holds none of them)."""
    chosen: dict[tuple[int, ...], PromptState] = {}
    for seq in seqs:
        state = store.get(model, "prompt", seq)
        if state is not None:
            chosen.setdefault(state.tokens, state)
    if not chosen:
        return 0
    prefixes: list[PrefixState] = []
    arrays: dict[str, mx.array] = {}
    prefix_of = []
    for i, state in enumerate(chosen.values()):
        j = next((j for j, p in enumerate(prefixes) if p is state.prefix), None)
        if j is None and state.prefix.length:
            j = len(prefixes)
            prefixes.append(state.prefix)
            arrays[f"x{j}.keys"] = mx.stack([k for k, _ in state.prefix.kv])
            arrays[f"x{j}.values"] = mx.stack([v for _, v in state.prefix.kv])
        prefix_of.append(-1 if j is None else j)
        for name in ("keys", "values", "logits", "last"):
            arrays[f"p{i}.{name}"] = getattr(state, name)
    metadata = {
        "format": STATES_FORMAT,
        "prompts": json.dumps([list(t) for t in chosen]),
        "prefixes": json.dumps([list(p.tokens) for p in prefixes]),
        "prefix_of": json.dumps(prefix_of),
    }
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    return sum(a.nbytes for a in arrays.values())


def _metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header alone (no array read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 2**30:
            raise ValueError(f"not a safetensors file: header size {size}")
        header = json.loads(f.read(size))
    return header.get("__metadata__") or {}


def load_states(path: Path, model: Any, store: StateStore = STORE) -> int:
    """Put the states in ``path`` (written by :func:`save_states` for this model) that the
    store lacks into it; how many prompts' states were loaded. A file whose shapes do not
    fit ``model`` (another model's states) raises :class:`StateFileError`: it is never used
    as if it were this model's."""
    fix = f"delete {path.parent} (its stage computes it again)"
    try:
        meta = _metadata(path)
        ours = meta.get("format") == STATES_FORMAT
        if ours:
            prompts = [tuple(t) for t in json.loads(meta["prompts"])]
            prefix_tokens = [tuple(t) for t in json.loads(meta["prefixes"])]
            prefix_of = json.loads(meta["prefix_of"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StateFileError(f"cannot read the unsteered states in {path} ({err}); {fix}") from err
    if not ours:
        raise StateFileError(f"{path} is not a file of unsteered states; {fix}")
    missing = [i for i, t in enumerate(prompts) if store.get(model, "prompt", t) is None]
    if not missing:
        return 0
    arrays = mx.load(str(path))
    assert isinstance(arrays, dict)
    anatomy = anatomy_of(model)
    n_layers, d_model = len(anatomy.layers), anatomy.d_model
    n_kv, head_dim = anatomy.n_kv_heads, anatomy.head_dim

    def check(name: str, got: tuple, want: tuple) -> None:  # None in want: any size
        same = len(got) == len(want)
        if not same or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
            raise StateFileError(
                f"{path}: {name} has shape {tuple(got)}, this model needs {tuple(want)}: the "
                f"states are another model's; {fix}"
            )

    prefixes: list[PrefixState] = []
    for j, tokens in enumerate(prefix_tokens):
        known = store.get(model, "prefix", tokens)
        if known is not None:
            prefixes.append(known)
            continue
        keys, values = arrays[f"x{j}.keys"], arrays[f"x{j}.values"]
        want = (n_layers, 1, n_kv, len(tokens), head_dim)
        check(f"prefix {j}'s keys", keys.shape, want)
        check(f"prefix {j}'s values", values.shape, want)
        prefix = PrefixState(tokens, [(keys[i], values[i]) for i in range(n_layers)])
        store.put(model, "prefix", prefix)
        prefixes.append(prefix)
    for i in missing:
        tokens, j = prompts[i], prefix_of[i]
        prefix = EMPTY if j < 0 else prefixes[j]
        own = len(tokens) - prefix.length
        state = PromptState(
            tokens,
            prefix,
            arrays[f"p{i}.keys"],
            arrays[f"p{i}.values"],
            arrays[f"p{i}.logits"],
            arrays[f"p{i}.last"],
        )
        check(f"prompt {i}'s keys", state.keys.shape, (n_layers, n_kv, own, head_dim))
        check(f"prompt {i}'s values", state.values.shape, state.keys.shape)
        check(f"prompt {i}'s residuals", state.last.shape, (n_layers, d_model))
        if state.logits.ndim != 1:
            raise StateFileError(f"{path}: prompt {i}'s logits are not one vector; {fix}")
        store.put(model, "prompt", state)
    return len(missing)
