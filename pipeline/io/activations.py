"""The capture artifact's on-disk format, and readers for the stages and notebook users.

One row per (prompt, layer, position): prompt_id, layer, position, vector. position is the
token index; -1 means the mean over the prompt's tokens. Site rows (``capture.sites``) add
a ``site`` column (e.g. ``layers.8.mlp``).

:func:`read_activations` returns vector as float32|float16 arrays [d_model] (a
fixed_size_list column in Arrow). On disk the column is fixed_size_binary: each vector's raw
little-endian bytes, with its dtype and d_model in the field's metadata. Parquet has no
fixed-size list, so a list column pays repetition and definition levels for every float and
writes at ~0.1-0.3x (float32) and ~0.04-0.1x (float16) of np.save; raw bytes write at
~0.75x and ~0.7x (``make bench``). Parts holding a list column (hand-written) read the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlx_interp.analysis.directions import DirectionError
from mlx_interp.analysis.probes import ProbeError
from mlx_interp.engine.dag import ConfigError
from mlx_interp.interventions.sites import parse_site


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


def write_part(table: pa.Table, path: Path) -> None:
    """Write a Parquet part through a temporary name, then rename (complete or absent).

    Options measured by ``make bench`` (bench/run.py parquet): no compression (activations
    barely compress), dictionary only for prompt_id, no statistics for the vector bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(
        table,
        tmp,
        compression="none",
        use_dictionary=["prompt_id"],
        write_statistics=["prompt_id", "layer", "position"],
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def read_activations(path: Path, layers: list[int] | None = None) -> pd.DataFrame:
    """Load a capture artifact's rows (optionally only some layers) as a DataFrame."""
    filters = [("layer", "in", layers)] if layers else None
    return decode_vectors(pq.read_table(path / "activations", filters=filters)).to_pandas()


def activation_matrix(df: pd.DataFrame, prompt_ids: list[str]) -> dict[int, np.ndarray]:
    """layer -> [n_prompts, d_model] float32, rows in ``prompt_ids`` order (one position each)."""
    out = {}
    for layer, group in df.groupby("layer", sort=True):
        group = group.drop_duplicates("prompt_id", keep="last").set_index("prompt_id")
        missing = [p for p in prompt_ids if p not in group.index]
        if missing:
            raise DirectionError(f"layer {layer}: no activation for prompt(s) {missing[:3]}")
        out[int(layer)] = np.stack(group.loc[prompt_ids, "vector"].to_numpy()).astype(np.float32)
    return out


def resolve_probe_layers(wanted: list[int] | None, captured: list[int]) -> list[int]:
    """Layers to probe; negative entries count from the last captured layer (-1 = last)."""
    if not wanted:
        return captured
    top = max(captured) + 1
    out = []
    for layer in wanted:
        abs_layer = top + int(layer) if int(layer) < 0 else int(layer)
        if abs_layer not in captured:
            raise ProbeError(
                f"probes.layers has {layer}, which was not captured (captured: {captured}); "
                "capture it (capture.layers) or drop it"
            )
        out.append(abs_layer)
    return sorted(set(out))


def layer_matrices(
    capture: Path, wanted: list[int] | None, prompt_ids: list[str]
) -> tuple[list[int], dict[int, np.ndarray]]:
    """The layers to use (``wanted`` resolved against the captured ones) and their
    [n_prompts, d_model] matrices in ``prompt_ids`` order; reads only those layers' rows."""
    captured = pq.read_table(capture / "activations", columns=["layer"]).column("layer")
    layers = resolve_probe_layers(wanted, sorted(int(x) for x in pc.unique(captured).to_pylist()))
    return layers, activation_matrix(read_activations(capture, layers), prompt_ids)
