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
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mlx_interp.engine.dag import ConfigError
from mlx_interp.engine.distributed import current_shard
from mlx_interp.interventions.capture import POSITIONS, capture_batch, resolve_layers
from mlx_interp.interventions.prefix import shared_prefix
from mlx_interp.interventions.sites import capture_sites_batch, resolve_sites
from mlx_interp.io.activations import batch_table, site_table, write_part
from mlx_interp.models.loading import load_model, model_fingerprint

log = logging.getLogger(__name__)

VERSION = "2"  # 2: last-token capture reuses the shared prefix's KV cache
DTYPES = {"float32": np.float32, "float16": np.float16}


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context (or capture.max_tokens)."""


def plan_batches(n_tokens: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices per batch, sorted by length so padding is small; deterministic."""
    if batch_size < 1:
        raise ConfigError(f"capture.batch_size must be >= 1, not {batch_size}")
    order = np.argsort(n_tokens, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def fingerprint(cfg: dict) -> dict:
    return {"model": model_fingerprint(cfg["model"])}


def run(cfg: dict, inputs: dict, out: Path) -> dict:
    """Stage entry: reads model, capture; needs prompts."""
    ccfg = cfg["capture"]
    if ccfg["positions"] not in POSITIONS:
        raise ConfigError(
            f"capture.positions must be one of {POSITIONS}, not {ccfg['positions']!r}"
        )
    if ccfg["dtype"] not in DTYPES:
        raise ConfigError(f"capture.dtype must be one of {list(DTYPES)}, not {ccfg['dtype']!r}")
    prompts = pd.read_parquet(inputs["prompts"] / "prompts.parquet")
    lm = load_model(cfg["model"])
    layers = resolve_layers(ccfg["layers"], lm.n_layers)
    limit = ccfg.get("max_tokens") or _context_length(lm.model)
    too_long = prompts[prompts["n_tokens"] > limit] if limit else prompts.iloc[:0]
    if len(too_long):
        row = too_long.iloc[0]
        raise PromptTooLongError(
            f"prompt {row.prompt_id!r} has {row.n_tokens} tokens, over the limit of {limit}; "
            "shorten it or raise capture.max_tokens"
        )
    pad_id = lm.pad_id
    act_dir = out / "activations"
    act_dir.mkdir(exist_ok=True)
    site_names = (
        [s.name for s in resolve_sites(lm.model, ccfg["sites"])] if ccfg.get("sites") else []
    )
    site_dir = out / "sites"
    if site_names:
        site_dir.mkdir(exist_ok=True)
    batches = plan_batches(prompts["n_tokens"].to_numpy(), int(ccfg["batch_size"]))
    resumed = 0
    prefix = None  # the prompts' shared prefix (few-shot turns), run once when first needed
    write_s, start = 0.0, time.perf_counter()
    shard = current_shard()  # under mlx.launch: this rank's share of the batches
    for b, rows in enumerate(tqdm(batches, desc="capture", unit="batch", leave=False)):
        if not shard.owns(b):
            continue
        part = act_dir / f"part-{b:05d}.parquet"
        site_part = site_dir / f"part-{b:05d}.parquet"
        need_sites = bool(site_names) and not site_part.exists()
        if part.exists() and not need_sites:  # completed by an interrupted earlier attempt
            resumed += 1
            continue
        seqs = [list(map(int, t)) for t in prompts["tokens"].iloc[rows]]
        ids = prompts["prompt_id"].iloc[rows].tolist()
        lengths = [len(s) for s in seqs]
        if not part.exists():
            if prefix is None:
                prefix = capture_prefix(lm.model, prompts["tokens"], ccfg["positions"])
            captured = capture_batch(
                lm.model, seqs, layers, ccfg["positions"], pad_id, prefix, DTYPES[ccfg["dtype"]]
            )
            table = batch_table(ids, captured, ccfg["positions"], lengths, DTYPES[ccfg["dtype"]])
            t = time.perf_counter()
            write_part(table, part)
            write_s += time.perf_counter() - t
        if need_sites:
            got = capture_sites_batch(lm.model, seqs, site_names, ccfg["positions"], pad_id)
            table = site_table(ids, got, ccfg["positions"], lengths, DTYPES[ccfg["dtype"]])
            write_part(table, site_part)
    if resumed:
        log.info("capture resumed: %d of %d batches were already complete", resumed, len(batches))
    meta = {
        "model": lm.name,
        "layers": layers,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "positions": ccfg["positions"],
        "dtype": ccfg["dtype"],
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
    timing = {"seconds": round(time.perf_counter() - start, 3), "write_seconds": round(write_s, 3)}
    return {**meta, "resumed_batches": resumed, "timing": timing}


def capture_prefix(model, tokens: pd.Series, positions: str) -> tuple[int, list | None]:
    """(length, KV cache) of the prefix all prompts share, for last-token capture: each batch
    then runs only its suffixes (exact, causal attention); (0, None) when not applicable."""
    if positions != "last" or len(tokens) < 2:
        return 0, None
    return shared_prefix(model, [list(map(int, t)) for t in tokens])


def _context_length(model) -> int | None:
    args = getattr(model, "args", None)
    for attr in ("max_position_embeddings", "context_length", "n_positions"):
        value = getattr(args, attr, None) if args is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None
