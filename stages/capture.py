"""Stage `capture`: prompts + model -> activations/ Parquet dataset.

One row per (prompt, layer, position): prompt_id, layer, position, vector
(fixed_size_list<float32|float16, d_model>). position is the token index; -1 means the mean
over the prompt's tokens. Batches are written as part files through an atomic rename, so
a killed capture resumes from the parts it completed and memory is bounded by one batch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.capture import POSITIONS, capture_batch, resolve_layers
from pipeline.models import load_model, model_fingerprint

log = logging.getLogger(__name__)

VERSION = "1"
DTYPES = {"float32": np.float32, "float16": np.float16}


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context (or capture.max_tokens)."""


def plan_batches(n_tokens: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices per batch, sorted by length so padding is small; deterministic."""
    if batch_size < 1:
        raise ValueError(f"capture.batch_size must be >= 1, not {batch_size}")
    order = np.argsort(n_tokens, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_table(
    ids: list[str], captured: dict, positions: str, lengths: list[int], dtype
) -> pa.Table:
    """Rows of one batch: layer-major, then prompt, then position."""
    prompt_ids, layers, pos, vecs = [], [], [], []
    for layer, value in captured.items():
        for i, pid in enumerate(ids):
            if positions == "all":
                arr = value[i]
                prompt_ids += [pid] * len(arr)
                pos.append(np.arange(len(arr), dtype=np.int32))
            else:
                arr = value[i][None, :]
                prompt_ids.append(pid)
                pos.append(np.array([-1 if positions == "mean" else lengths[i] - 1]))
            layers.append(np.full(len(arr), layer, dtype=np.int16))
            vecs.append(arr)
    flat = np.concatenate(vecs).astype(dtype, copy=False)
    d_model = flat.shape[1]
    vector = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), d_model)
    return pa.table(
        {
            "prompt_id": pa.array(prompt_ids, pa.string()),
            "layer": pa.array(np.concatenate(layers), pa.int16()),
            "position": pa.array(np.concatenate(pos).astype(np.int32), pa.int32()),
            "vector": vector,
        }
    )


def write_part(table: pa.Table, path: Path) -> None:
    """Write a Parquet part through a temporary name, then rename (complete or absent)."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="none", use_dictionary=["prompt_id"])
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(cfg: dict) -> dict:
    return {"model": model_fingerprint(cfg["model"])}


def run(cfg: dict, inputs: dict, out: Path) -> dict:
    """Stage entry: reads model, capture; needs prompts."""
    ccfg = cfg["capture"]
    if ccfg["positions"] not in POSITIONS:
        raise ValueError(f"capture.positions must be one of {POSITIONS}, not {ccfg['positions']!r}")
    if ccfg["dtype"] not in DTYPES:
        raise ValueError(f"capture.dtype must be one of {list(DTYPES)}, not {ccfg['dtype']!r}")
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
    batches = plan_batches(prompts["n_tokens"].to_numpy(), int(ccfg["batch_size"]))
    resumed = 0
    for b, rows in enumerate(tqdm(batches, desc="capture", unit="batch", leave=False)):
        part = act_dir / f"part-{b:05d}.parquet"
        if part.exists():  # completed by an interrupted earlier attempt of this same key
            resumed += 1
            continue
        seqs = [list(map(int, t)) for t in prompts["tokens"].iloc[rows]]
        captured = capture_batch(lm.model, seqs, layers, ccfg["positions"], pad_id=pad_id)
        ids = prompts["prompt_id"].iloc[rows].tolist()
        lengths = [len(s) for s in seqs]
        table = batch_table(ids, captured, ccfg["positions"], lengths, DTYPES[ccfg["dtype"]])
        write_part(table, part)
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
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return {**meta, "resumed_batches": resumed}


def _context_length(model) -> int | None:
    args = getattr(model, "args", None)
    for attr in ("max_position_embeddings", "context_length", "n_positions"):
        value = getattr(args, attr, None) if args is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_activations(path: Path, layers: list[int] | None = None) -> pd.DataFrame:
    """Load a capture artifact's rows (optionally only some layers) as a DataFrame."""
    filters = [("layer", "in", layers)] if layers else None
    return pq.read_table(path / "activations", filters=filters).to_pandas()
