"""Stage `capture`: prompts + model -> activations/ Parquet dataset.

One row per (prompt, layer, position): prompt_id, layer, position, vector. position is the
token index; -1 means the mean over the prompt's tokens. Batches are written as part files
through an atomic rename, so a killed capture resumes from the parts it completed and memory
is bounded by one batch.

The file format and its readers (``read_activations``, ``read_sites``) live in
:mod:`mlx_interp.io.activations`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mlx_interp.analysis.stats import require_finite
from mlx_interp.engine.dag import ConfigError, Stage
from mlx_interp.engine.distributed import current_shard
from mlx_interp.engine.integrity import sealed_intact
from mlx_interp.engine.schema import CaptureConfig, ModelConfig
from mlx_interp.errors import MlxInterpError
from mlx_interp.interventions.capture import capture_batch, resolve_layers
from mlx_interp.interventions.prefix import shared_prefix
from mlx_interp.interventions.site_hooks import flat_width
from mlx_interp.interventions.sites import capture_sites_batch, resolve_sites
from mlx_interp.io.activations import batch_table, site_table, write_part
from mlx_interp.models.anatomy import anatomy_of
from mlx_interp.models.loading import load_model, model_fingerprint

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class CaptureInputs:
    model: ModelConfig
    capture: CaptureConfig


class PromptTooLongError(MlxInterpError, ValueError):
    """A prompt does not fit the model's context (or capture.max_tokens)."""


MAX_SCORES = 2**31 - 1  # MLX indexes arrays with int32 in places (ml-explore/mlx#3327)


def plan_batches(
    n_tokens: np.ndarray, batch_size: int, n_heads: int = 1, max_bytes: float | None = None
) -> list[np.ndarray]:
    """Row indices per batch, sorted by length so padding is small; deterministic.

    A batch of ``b`` prompts padded to ``L`` tokens makes attention scores [b, n_heads, L, L]
    on the CPU; a batch whose scores would pass 2^31 elements or ``max_bytes`` (float32) is
    split, so a long prompt runs alone instead of crashing the process with its batch."""
    order = np.argsort(n_tokens, kind="stable")
    batches, start = [], 0
    while start < len(order):
        stop = min(start + batch_size, len(order))
        while stop - start > 1 and not _scores_fit(
            stop - start, int(n_tokens[order[stop - 1]]), n_heads, max_bytes
        ):
            stop -= 1
        batches.append(order[start:stop])
        start = stop
    return batches


def _scores_fit(batch: int, length: int, n_heads: int, max_bytes: float | None) -> bool:
    scores = batch * n_heads * length * length
    return scores <= MAX_SCORES and (max_bytes is None or 4 * scores <= max_bytes)


def attention_budget_bytes() -> float | None:
    """Half the machine's physical memory: the most one batch's attention scores may use."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError):
        return None


def fingerprint(inputs: CaptureInputs) -> dict:
    return {"model": model_fingerprint(inputs.model)}


def run(inputs: CaptureInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the activations of every prompt; needs prompts."""
    ccfg = inputs.capture
    positions, dtype = ccfg.positions, DTYPES[ccfg.dtype]
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    lm = load_model(inputs.model)
    layers = resolve_layers(ccfg.layers, lm.n_layers)
    limit = token_limit(ccfg.max_tokens, _context_length(lm.model), lm.name)
    too_long = prompts[prompts["n_tokens"] > limit]
    if len(too_long):
        row = too_long.iloc[0]
        raise PromptTooLongError(
            f"prompt {row.prompt_id!r} has {row.n_tokens} tokens, over the limit of {limit} "
            f"({len(too_long)} prompt(s) are); shorten them"
            + (
                " or raise capture.max_tokens"
                if limit < (_context_length(lm.model) or 0)
                else f" (the model's context is {limit} tokens)"
            )
        )
    pad_id = lm.pad_id
    act_dir = out / "activations"
    act_dir.mkdir(exist_ok=True)
    chosen = resolve_sites(lm.model, ccfg.sites) if ccfg.sites else []
    widths = {s.name: flat_width(lm.model, s) for s in chosen}
    per_key = [name for name, width in widths.items() if width is None]
    if per_key:  # the artifact holds one vector of one width per (prompt, position)
        raise ConfigError(
            f"capture.sites: {per_key[0]} has one value per key token, not one vector per "
            "position; record attention patterns with Model.run_with_cache instead"
        )
    if len(set(widths.values())) > 1:
        raise ConfigError(
            f"capture.sites mixes vector widths ({widths}); the sites/ parts hold one width: "
            "capture sites of another width in a run of their own"
        )
    site_names = list(widths)
    site_dir = out / "sites"
    if site_names:
        site_dir.mkdir(exist_ok=True)
    n_heads = anatomy_of(lm.model).n_heads or 1  # the one head count (sites.head_shape's too)
    budget = attention_budget_bytes()
    longest = int(prompts["n_tokens"].max())
    if not _scores_fit(1, longest, n_heads, budget):
        raise PromptTooLongError(
            f"a prompt of {longest} tokens needs attention scores of {n_heads} x {longest}^2 "
            "floats, more than this machine (or MLX's int32 indexing) can hold; shorten it or "
            "lower capture.max_tokens"
        )
    batches = plan_batches(prompts["n_tokens"].to_numpy(), ccfg.batch_size, n_heads, budget)
    resumed = 0
    prefix = None  # the prompts' shared prefix (few-shot turns), run once when first needed
    write_s, hash_s, start = 0.0, 0.0, time.perf_counter()
    shard = current_shard()  # under mlx.launch: this rank's share of the batches
    for b, rows in enumerate(tqdm(batches, desc="capture", unit="batch", leave=False)):
        if not shard.owns(b):
            continue
        part = act_dir / f"part-{b:05d}.parquet"
        site_part = site_dir / f"part-{b:05d}.parquet"
        need_sites = bool(site_names) and not sealed_intact(site_part)
        have_part = sealed_intact(part)  # written and sealed by an earlier attempt, unchanged
        if have_part and not need_sites:
            resumed += 1
            continue
        seqs = [list(map(int, t)) for t in prompts["tokens"].iloc[rows]]
        ids = prompts["prompt_id"].iloc[rows].tolist()
        lengths = [len(s) for s in seqs]
        if not have_part:
            if prefix is None:
                prefix = capture_prefix(lm.model, prompts["tokens"], positions)
            captured = capture_batch(lm.model, seqs, layers, positions, pad_id, prefix, dtype)
            for layer, value in captured.items():
                require_finite(
                    value if positions != "all" else np.concatenate(value),
                    f"activations of layer {layer} (batch {b}, prompts {ids[:2]}...)",
                    "the model overflowed: use capture.dtype=float32 and model.dequantize=true",
                )
            table = batch_table(ids, captured, positions, lengths, dtype)
            t = time.perf_counter()
            hash_s += write_part(table, part) or 0.0
            write_s += time.perf_counter() - t
        if need_sites:
            got = capture_sites_batch(lm.model, seqs, site_names, positions, pad_id)
            table = site_table(ids, got, positions, lengths, dtype)
            write_part(table, site_part)
    if resumed:
        log.info("capture resumed: %d of %d batches were already complete", resumed, len(batches))
    meta = {
        "model": lm.name,
        "layers": layers,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "positions": positions,
        "dtype": ccfg.dtype,
        "n_prompts": int(len(prompts)),
        "n_batches": len(batches),
        "dequantized": lm.dequantized,
        "sites": site_names,
    }
    if shard.size > 1:
        mine = sum(shard.owns(b) for b in range(len(batches)))
        log.info(
            "capture shard %d/%d: %d of %d batches", shard.rank, shard.size, mine, len(batches)
        )
    if shard.rank == 0:  # one writer of the shared metadata
        (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    timing = {
        "seconds": round(time.perf_counter() - start, 3),
        "write_seconds": round(write_s, 3),
        "hash_seconds": round(hash_s, 4),
    }
    return {**meta, "resumed_batches": resumed, "timing": timing}


def capture_prefix(model, tokens: pd.Series, positions: str) -> tuple[int, list | None]:
    """(length, KV cache) of the prefix all prompts share, for last-token capture: each batch
    then runs only its suffixes (exact, causal attention); (0, None) when not applicable."""
    if positions != "last" or len(tokens) < 2:
        return 0, None
    return shared_prefix(model, [list(map(int, t)) for t in tokens])


def token_limit(max_tokens: int | None, context: int | None, model_name: str) -> int:
    """The longest prompt capture accepts: capture.max_tokens, never above the model's context.

    Longer inputs are what crashed the CPU backend (see docs/notes/trust.md), so a model must
    state its context; capture.max_tokens cannot raise it."""
    if context is None:
        raise PromptTooLongError(
            f"model {model_name} does not state its context length (max_position_embeddings), "
            "so long prompts cannot be refused safely; use a model whose config has it"
        )
    if max_tokens is not None and max_tokens > context:
        raise ConfigError(
            f"capture.max_tokens={max_tokens} is over the context of model {model_name} "
            f"({context} tokens): the model cannot read longer prompts; e.g. "
            f"capture.max_tokens={context}"
        )
    return int(max_tokens or context)


def _context_length(model) -> int | None:
    args = getattr(model, "args", None)
    for attr in ("max_position_embeddings", "context_length", "n_positions"):
        value = getattr(args, attr, None) if args is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


STAGE = Stage(
    name="capture",
    run=run,
    inputs=CaptureInputs,
    needs=("prompts",),
    fingerprint=fingerprint,
    resumable=True,  # part files of a killed attempt are reused
    sharded=True,  # under mlx.launch each rank captures its share of the batches
    writes=("activations", "meta.json"),
)
