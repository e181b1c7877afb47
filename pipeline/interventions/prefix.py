"""Shared-prefix KV cache reuse, batched last-token logits and batched greedy generation.

Prompts of one experiment share most of their tokens (the chat template's system prompt
and the few-shot examples). The prefix is run once per model state (once per steering
setting: run these functions inside ``steer(...)``, whose edits apply to the prefix too),
and each batch runs only its suffix tokens on a copy of that cache. Position-wise edits make
this exact: the result equals a full forward of every sequence.

Batches are right-padded for the prompt (causal attention: real positions never see the
pads). Greedy generation then moves each row's pads to the left of its cache (as mlx-lm's
``BatchKVCache`` does after a right-padded prefill) and decodes every row at its own
position with a mask that hides the pads, so a batched answer equals the one-prompt answer.
The LM head runs only at the positions whose logits are used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll, make_prompt_cache

from mlx_interp.interventions.classswap import swapped

MIN_PREFIX = 4  # shorter shared prefixes are not worth a cache


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest shared prefix, leaving each sequence at least one own token."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for i in range(max(n, 0)):
        tok = first[i]
        if any(s[i] != tok for s in seqs):
            return i
    return max(n, 0)


def _plain_cache(model: Any) -> list | None:
    """A fresh mlx-lm cache if every layer's is a plain KVCache (else None: callers fall back)."""
    cache = make_prompt_cache(model)
    return cache if all(type(c) is KVCache for c in cache) else None


def prefix_cache(model: Any, prefix: Sequence[int]) -> list | None:
    """KV cache [1 sequence] after running ``prefix``; None if the model's cache is not a plain
    KVCache (sliding-window or recurrent caches are not copied: callers fall back)."""
    if len(prefix) < MIN_PREFIX:
        return None
    cache = _plain_cache(model)
    if cache is None:
        return None
    inner = getattr(model, "model", None)  # the transformer body: no LM head needed here
    run = inner if inner is not None and hasattr(inner, "layers") else model
    run(mx.array([list(prefix)]), cache=cache)
    mx.eval([c.keys for c in cache] + [c.values for c in cache])
    return cache


def shared_prefix(model: Any, seqs: Sequence[Sequence[int]]) -> tuple[int, list | None]:
    """(length, cache) of the prefix all ``seqs`` share, run in the model's current state;
    (0, None) when there is none worth caching."""
    p = common_prefix_len(seqs) if len(seqs) > 1 else 0
    cache = prefix_cache(model, seqs[0][:p]) if p else None
    return (p, cache) if cache is not None else (0, None)


def expand_cache(cache: list, batch: int) -> list:
    """Fresh KVCache objects holding ``batch`` copies of a one-sequence cache."""
    out = []
    for c in cache:
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        new = KVCache()
        new.keys, new.values = mx.repeat(k, batch, axis=0), mx.repeat(v, batch, axis=0)
        new.offset = c.offset
        out.append(new)
    return out


def _resolve_prefix(model, seqs, prefix) -> tuple[int, list | None]:
    if prefix is False:
        return 0, None
    if prefix is None:
        return shared_prefix(model, seqs)
    return prefix


@contextmanager
def head_at(model: Any, positions: mx.array) -> Iterator[bool]:
    """Run the LM head only at ``positions`` [batch] (one per row): inside, ``model(tokens)``
    returns logits [batch, 1, vocab]. Swaps the class of ``model.model`` (the transformer
    body of mlx-lm models) for one that keeps only those rows of its final hidden states;
    yields False (nothing swapped, full logits) for a model without that body."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        yield False
        return
    original = type(inner)
    original_call = original.__call__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h = original_call(self, *args, **kwargs)
        if not isinstance(h, mx.array) or h.ndim != 3 or h.shape[0] != positions.shape[0]:
            return h
        return h[mx.arange(h.shape[0]), positions][:, None, :]

    with swapped(inner, "HeadAt", __call__):
        yield True


def last_logits(model: Any, tokens: mx.array, last: Sequence[int], cache=None) -> mx.array:
    """Logits [batch, vocab] at position ``last[i]`` of row i (LM head run only there)."""
    idx = mx.array(list(last), dtype=mx.int32)
    with head_at(model, idx):
        logits = model(tokens, cache=cache)
    if logits.shape[1] == 1:
        return logits[:, 0]
    return logits[mx.arange(tokens.shape[0]), idx]  # the head ran everywhere


def _right_padded(suffixes: list[list[int]], pad_id: int) -> mx.array:
    width = max(len(s) for s in suffixes)
    return mx.array([s + [pad_id] * (width - len(s)) for s in suffixes], dtype=mx.int32)


def batched_last_logits(
    model: Any,
    seqs: Sequence[Sequence[int]],
    pad_id: int = 0,
    batch_size: int = 16,
    prefix: tuple[int, list | None] | bool | None = None,
) -> np.ndarray:
    """float32 [n, vocab] logits at each sequence's last token; batches are right-padded
    (causal attention: real positions never see the pads) and share the prefix cache.

    prefix: None = find and run the shared prefix now (in the current model state);
    False = no reuse; (length, cache) = a prefix run earlier (e.g. unsteered)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    p, cache0 = _resolve_prefix(model, seqs, prefix)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out: list[np.ndarray | None] = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        suffixes = [list(seqs[i][p:]) for i in idx]
        cache = expand_cache(cache0, len(idx)) if cache0 is not None else None
        logits = last_logits(
            model, _right_padded(suffixes, pad_id), [len(s) - 1 for s in suffixes], cache
        )
        for row, i in zip(np.array(logits.astype(mx.float32)), idx, strict=True):
            out[int(i)] = row
    return np.stack(cast(list[np.ndarray], out))  # every row filled


def eos_ids(tokenizer: Any) -> set[int]:
    """End-of-sequence token ids of an mlx-lm ``TokenizerWrapper`` or a HF tokenizer."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        single = getattr(tokenizer, "eos_token_id", None)
        ids = [] if single is None else [single]
    return {int(i) for i in ids}


def _greedy_one(model, seq, max_tokens, eos, p, cache0) -> list[int]:
    """Greedy answer for one prompt: the prompt (after the prefix in ``cache0``) in one
    forward, then one token per step, in the model's own cache (sliding-window caches too).
    The same tokens as mlx-lm's ``generate_step`` with an argmax sampler (tested), which
    instead splits the prompt forward in two: a per-row position mask needs it whole."""
    cache = expand_cache(cache0, 1) if cache0 is not None else make_prompt_cache(model)
    logits = model(mx.array([list(seq[p:])], dtype=mx.int32), cache=cache)[:, -1]
    token = mx.argmax(logits, axis=-1)  # [1]
    mx.async_eval(token)
    ids: list[int] = []
    for step in range(max_tokens):
        ahead = None
        if step < max_tokens - 1:  # queue the next step before waiting for this token
            ahead = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
            mx.async_eval(ahead)
        value = int(token)
        if value in eos:
            break
        ids.append(value)
        if ahead is None:
            break
        token = ahead
    return ids


def batchable(model: Any) -> bool:
    """Whether prompts of ``model`` decode together (every layer's cache a plain KVCache);
    otherwise each prompt decodes alone (e.g. Gemma 3's sliding-window layers)."""
    return _plain_cache(model) is not None


def _decode_cache(cache: list, lengths: list[int], width: int) -> list[BatchKVCache]:
    """BatchKVCaches continuing a right-padded prefill of ``lengths`` suffix tokens (padded to
    ``width``) after a shared prefix: each row's pads are rolled to the left, where the mask
    hides them, and each row decodes from its own position (RoPE offset)."""
    pads = [width - n for n in lengths]
    shift = mx.array(pads, dtype=mx.int32)
    out = []
    for c in cache:
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        new = BatchKVCache(pads)
        new.keys = dynamic_roll(k, shift[:, None], axis=2)
        new.values = dynamic_roll(v, shift[:, None], axis=2)
        new._idx = c.offset
        new.offset = mx.array([c.offset - n for n in pads], dtype=mx.int32)
        out.append(new)
    return out


def _greedy_batch(model, suffixes, max_tokens, eos, cache0, pad_id) -> list[list[int]] | None:
    """Greedy answers for one batch of suffixes (after the prefix in ``cache0``, if any);
    None if the model's cache cannot be batched this way."""
    n = len(suffixes)
    cache = expand_cache(cache0, n) if cache0 is not None else _plain_cache(model)
    if cache is None:
        return None
    lengths = [len(s) for s in suffixes]
    logits = last_logits(model, _right_padded(suffixes, pad_id), [k - 1 for k in lengths], cache)
    token = mx.argmax(logits, axis=-1)
    cache = _decode_cache(cache, lengths, max(lengths))
    ids: list[list[int]] = [[] for _ in range(n)]
    active = list(range(n))  # row of the batch -> index into ids
    for step in range(max_tokens):
        tokens = cast(list[int], token.tolist())
        keep = []
        for row, tok in enumerate(tokens):
            if tok in eos:
                continue
            ids[active[row]].append(tok)
            keep.append(row)
        if step == max_tokens - 1 or not keep:
            break
        if len(keep) < len(active):
            kept = mx.array(keep, dtype=mx.int32)
            for c in cache:
                c.filter(kept)
            token = token[kept]
            active = [active[row] for row in keep]
        logits = model(token[:, None], cache=cache)[:, -1]
        token = mx.argmax(logits, axis=-1)
    return ids


def greedy_generate(
    model: Any,
    tokenizer: Any,
    seqs: Sequence[Sequence[int]],
    max_tokens: int = 12,
    prefix: tuple[int, list | None] | bool | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[tuple[str, list[int]]]:
    """Greedy answers (text, token ids; EOS excluded), each started from a copy of the shared
    prefix's cache. ``batch_size`` prompts (sorted by length) decode together; 1 runs
    mlx-lm's own generate loop per prompt. Both give the same tokens."""
    eos = eos_ids(tokenizer)
    p, cache0 = _resolve_prefix(model, seqs, prefix)
    answers: list[list[int] | None] = [None] * len(seqs)
    if batch_size > 1 and len(seqs) > 1:
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start : start + batch_size]]
            got = _greedy_batch(
                model, [list(seqs[i][p:]) for i in idx], max_tokens, eos, cache0, pad_id
            )
            if got is None:
                break
            for i, ids in zip(idx, got, strict=True):
                answers[i] = ids
    for i, seq in enumerate(seqs):
        if answers[i] is None:
            answers[i] = _greedy_one(model, seq, max_tokens, eos, p, cache0)
    done = cast(list[list[int]], answers)  # every prompt answered
    return [(tokenizer.decode(ids), ids) for ids in done]
