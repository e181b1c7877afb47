"""Reuse of a shared prompt prefix (system prompt, few-shot turns) through mlx-lm's KV cache.

Prompts of one experiment share most of their tokens (the chat template's system prompt
and the few-shot examples). The prefix is run once per model state (once per steering
setting: run these functions inside ``steer(...)``, whose edits apply to the prefix too),
and each batch runs only its suffix tokens on a copy of that cache. Position-wise edits make
this exact: the result equals a full forward of every sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

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


def prefix_cache(model: Any, prefix: Sequence[int]) -> list | None:
    """KV cache [1 sequence] after running ``prefix``; None if the model's cache is not a plain
    KVCache (sliding-window or recurrent caches are not copied: callers fall back)."""
    if len(prefix) < MIN_PREFIX:
        return None
    cache = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in cache):
        return None
    model(mx.array([list(prefix)]), cache=cache)
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
        width = max(len(s) for s in suffixes)
        tokens = mx.array([s + [pad_id] * (width - len(s)) for s in suffixes])
        cache = expand_cache(cache0, len(idx)) if cache0 is not None else None
        logits = model(tokens, cache=cache)
        last = mx.array([len(s) - 1 for s in suffixes])
        picked = logits[mx.arange(len(idx)), last].astype(mx.float32)
        for row, i in zip(np.array(picked), idx, strict=True):
            out[int(i)] = row
    return np.stack(out)


def eos_ids(tokenizer: Any) -> set[int]:
    """End-of-sequence token ids of an mlx-lm ``TokenizerWrapper`` or a HF tokenizer."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        single = getattr(tokenizer, "eos_token_id", None)
        ids = [] if single is None else [single]
    return {int(i) for i in ids}


def greedy_generate(
    model: Any,
    tokenizer: Any,
    seqs: Sequence[Sequence[int]],
    max_tokens: int = 12,
    prefix: tuple[int, list | None] | bool | None = None,
) -> list[tuple[str, list[int]]]:
    """Greedy answers (text, token ids; EOS excluded) with mlx-lm's generate loop and KV cache,
    each started from a copy of the shared prefix's cache."""
    from mlx_lm.generate import generate_step

    eos = eos_ids(tokenizer)
    p, cache0 = _resolve_prefix(model, seqs, prefix)
    results = []
    for seq in seqs:
        cache = expand_cache(cache0, 1) if cache0 is not None else None
        prompt = mx.array(list(seq[p:]), dtype=mx.int32)
        ids: list[int] = []
        for token, _ in generate_step(prompt, model, max_tokens=max_tokens, prompt_cache=cache):
            if int(token) in eos:
                break
            ids.append(int(token))
        results.append((tokenizer.decode(ids), ids))
    return results
