"""Stage `capture`: prompts + model -> activations/ Parquet dataset.

One row per (prompt, layer, position): prompt_id, layer, position, vector. position is the
token index; -1 means the mean over the prompt's tokens. Batches are written as part files
through an atomic rename, so a killed capture resumes from the parts it completed and memory
is bounded by one batch.

:func:`read_activations` returns vector as float32|float16 arrays [d_model] (a
fixed_size_list column in Arrow). On disk the column is fixed_size_binary: each vector's raw
little-endian bytes, with its dtype and d_model in the field's metadata. Parquet has no
fixed-size list, so a list column pays repetition and definition levels for every float and
writes at ~0.1-0.3x (float32) and ~0.04-0.1x (float16) of np.save; raw bytes write at
~0.75x and ~0.7x (``make bench``). Parts holding a list column (hand-written) read the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.capture import POSITIONS, capture_batch, resolve_layers
from pipeline.dag import ConfigError
from pipeline.distributed import current_shard
from pipeline.errors import MlxInterpError
from pipeline.integrity import seal, sealed_intact
from pipeline.models import load_model, model_fingerprint
from pipeline.prefix import shared_prefix
from pipeline.sites import capture_sites_batch, parse_site, resolve_sites
from pipeline.stats import require_finite

log = logging.getLogger(__name__)

VERSION = "2"  # 2: last-token capture reuses the shared prefix's KV cache
DTYPES = {"float32": np.float32, "float16": np.float16}


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
    if batch_size < 1:
        raise ConfigError(f"capture.batch_size must be >= 1, not {batch_size}")
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


def batch_table(
    ids: list[str], captured: dict, positions: str, lengths: list[int], dtype
) -> pa.Table:
    """Rows of one batch: layer-major, then prompt, then position. With one row per (layer,
    prompt) each layer's [batch, d_model] array becomes one chunk of the vector column as it
    is (no copy when it already has ``dtype``)."""
    layer_ids = list(captured)
    if positions == "all":
        prompt_ids, layers, pos, vecs = [], [], [], []
        for layer, value in captured.items():
            for i, pid in enumerate(ids):
                arr = value[i]
                prompt_ids += [pid] * len(arr)
                pos.append(np.arange(len(arr), dtype=np.int32))
                layers.append(np.full(len(arr), layer, dtype=np.int16))
                vecs.append(arr)
        vector_field, vector = vector_column(np.concatenate(vecs).astype(dtype, copy=False))
        layer_col, pos_col = np.concatenate(layers), np.concatenate(pos)
    else:  # one row per (layer, prompt): no per-row Python work
        chunks = [vector_column(np.asarray(captured[layer], dtype=dtype)) for layer in layer_ids]
        vector_field = chunks[0][0]
        vector = pa.chunked_array([chunk for _, chunk in chunks], vector_field.type)
        prompt_ids = list(ids) * len(layer_ids)
        layer_col = np.repeat(np.array(layer_ids, dtype=np.int16), len(ids))
        one = [-1] * len(ids) if positions == "mean" else [n - 1 for n in lengths]
        pos_col = np.tile(np.array(one, dtype=np.int32), len(layer_ids))
    schema = pa.schema(
        [
            pa.field("prompt_id", pa.string()),
            pa.field("layer", pa.int16()),
            pa.field("position", pa.int32()),
            vector_field,
        ]
    )
    columns = [
        pa.array(prompt_ids, pa.string()),
        pa.array(layer_col, pa.int16()),
        pa.array(pos_col.astype(np.int32, copy=False), pa.int32()),
        vector,
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def vector_column(flat: np.ndarray) -> tuple[pa.Field, pa.Array]:
    """[rows, d_model] float array -> (field, fixed_size_binary column of each row's raw
    little-endian bytes); the field's metadata names the dtype and d_model."""
    flat = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<"))
    rows, width = flat.shape
    kind = pa.binary(width * flat.dtype.itemsize)
    meta = {"dtype": np.dtype(flat.dtype).name, "d_model": str(width)}
    array = pa.FixedSizeBinaryArray.from_buffers(kind, rows, [None, pa.py_buffer(flat)])
    return pa.field("vector", kind, metadata=meta), array


def decode_vectors(table: pa.Table) -> pa.Table:
    """Turn a fixed_size_binary vector column back into fixed_size_list<float> (zero-copy view
    of the bytes); a list column is returned as it is."""
    index = table.schema.get_field_index("vector")
    if index < 0 or not pa.types.is_fixed_size_binary(table.schema.field(index).type):
        return table
    field = table.schema.field(index)
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    if "dtype" not in meta or "d_model" not in meta:
        raise ValueError("the vector column has no dtype/d_model metadata: not a capture part")
    dtype, width = np.dtype(meta["dtype"]).newbyteorder("<"), int(meta["d_model"])
    column = table.column(index).combine_chunks()
    values = np.zeros(0, dtype)
    if len(column):
        start = column.offset * column.type.byte_width
        values = np.frombuffer(
            column.buffers()[1], dtype=dtype, count=len(column) * width, offset=start
        )
    native = values.astype(dtype.newbyteorder("="), copy=False)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(native), width)
    return table.set_column(index, pa.field("vector", vectors.type), vectors)


def write_part(table: pa.Table, path: Path) -> float:
    """Write a Parquet part through a temporary name, then rename (complete or absent), and
    seal it with its sha256 (hashed from memory: no second read). Returns the seconds spent
    hashing (``make bench`` reports their share of the capture stage).

    Options measured by ``make bench`` (bench/run.py parquet): no compression (activations
    barely compress), dictionary only for prompt_id, no statistics for the vector bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="none",
        use_dictionary=["prompt_id"],
        write_statistics=["prompt_id", "layer", "position"],
    )
    data = sink.getvalue()
    hashing = time.perf_counter()
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    hashing = time.perf_counter() - hashing
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    seal(path, digest)  # a later attempt keeps this part only while its bytes match
    return hashing


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
    limit = token_limit(ccfg.get("max_tokens"), _context_length(lm.model), lm.name)
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
    site_names = (
        [s.name for s in resolve_sites(lm.model, ccfg["sites"])] if ccfg.get("sites") else []
    )
    site_dir = out / "sites"
    if site_names:
        site_dir.mkdir(exist_ok=True)
    n_heads = int(getattr(getattr(lm.model, "args", None), "num_attention_heads", 1) or 1)
    budget = attention_budget_bytes()
    longest = int(prompts["n_tokens"].max())
    if not _scores_fit(1, longest, n_heads, budget):
        raise PromptTooLongError(
            f"a prompt of {longest} tokens needs attention scores of {n_heads} x {longest}^2 "
            "floats, more than this machine (or MLX's int32 indexing) can hold; shorten it or "
            "lower capture.max_tokens"
        )
    batches = plan_batches(prompts["n_tokens"].to_numpy(), int(ccfg["batch_size"]), n_heads, budget)
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
                prefix = capture_prefix(lm.model, prompts["tokens"], ccfg["positions"])
            captured = capture_batch(
                lm.model, seqs, layers, ccfg["positions"], pad_id, prefix, DTYPES[ccfg["dtype"]]
            )
            for layer, value in captured.items():
                require_finite(
                    value if ccfg["positions"] != "all" else np.concatenate(value),
                    f"activations of layer {layer} (batch {b}, prompts {ids[:2]}...)",
                    "the model overflowed: use capture.dtype=float32 and model.dequantize=true",
                )
            table = batch_table(ids, captured, ccfg["positions"], lengths, DTYPES[ccfg["dtype"]])
            t = time.perf_counter()
            hash_s += write_part(table, part) or 0.0
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
    timing = {
        "seconds": round(time.perf_counter() - start, 3),
        "write_seconds": round(write_s, 3),
        "hash_seconds": round(hash_s, 4),
    }
    return {**meta, "resumed_batches": resumed, "timing": timing}


def site_table(ids: list[str], got: dict, positions: str, lengths: list[int], dtype) -> pa.Table:
    """Rows of one batch of site outputs: like :func:`batch_table` plus a ``site`` column
    (e.g. ``layers.8.mlp``); per-head outputs are flattened to n_heads * head_dim."""
    names = list(got)

    def flat(value):
        if positions == "all":
            return [v.reshape(len(v), -1) for v in value]
        return value.reshape(len(value), -1)

    table = batch_table(
        ids, {i: flat(got[n]) for i, n in enumerate(names)}, positions, lengths, dtype
    )
    index = table.column("layer").to_numpy()
    site_col = pa.array([names[i] for i in index], pa.string())
    layer_col = pa.array([parse_site(names[i]).layer for i in index], pa.int16())
    table = table.set_column(1, "layer", layer_col)
    return table.add_column(1, "site", site_col)


def read_sites(path: Path, sites: list[str] | None = None) -> pd.DataFrame:
    """A capture artifact's site rows (``capture.sites``): prompt_id, site, layer, position,
    vector (heads flattened to n_heads * head_dim)."""
    if not (path / "sites").is_dir():
        raise ConfigError(
            f"{path} has no site activations: capture them with capture.sites=[layers.8.mlp,...]"
        )
    filters = [("site", "in", sites)] if sites else None
    return decode_vectors(pq.read_table(path / "sites", filters=filters)).to_pandas()


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


def read_activations(path: Path, layers: list[int] | None = None) -> pd.DataFrame:
    """Load a capture artifact's rows (optionally only some layers) as a DataFrame."""
    filters = [("layer", "in", layers)] if layers else None
    return decode_vectors(pq.read_table(path / "activations", filters=filters)).to_pandas()
