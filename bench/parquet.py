"""Parquet write speed of capture parts against np.save of the same array.

The array is 1000 prompts x 30 layers x 576 (SmolLM2-135M's last-token capture), in float32
and float16. Both sides write to the same temporary folder and are fsynced, as the capture
stage fsyncs its parts; the Parquet side includes building the table (stages.capture
batch_table) from per-layer arrays in the stored dtype, as capture_batch returns them, and
its write options (write_part). For contrast the same vectors are also timed
as a fixed_size_list column (the layout before: repetition/definition levels per float).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _fsynced(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _best(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def parquet_vs_npsave(n: int = 1000, layers: int = 30, d_model: int = 576) -> dict:
    import pyarrow.parquet as pq

    from mlx_interp.io.activations import batch_table, decode_vectors, write_part

    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, layers, d_model), dtype=np.float32)
    ids = [f"prompt-{i:05d}" for i in range(n)]
    lengths = [100] * n
    out: dict = {"shape": [n, layers, d_model]}
    with tempfile.TemporaryDirectory(prefix="bench-parquet-") as tmp:
        tmp = Path(tmp)
        for dtype in (np.float32, np.float16):
            arr = data.astype(dtype)
            # per layer, contiguous and in the stored dtype: as capture_batch returns them
            captured = {layer: np.ascontiguousarray(arr[:, layer]) for layer in range(layers)}

            def npsave(arr=arr):
                np.save(tmp / "a.npy", arr)
                _fsynced(tmp / "a.npy")

            def parquet(dtype=dtype, captured=captured):
                write_part(batch_table(ids, captured, "last", lengths, dtype), tmp / "p.parquet")

            def listed(dtype=dtype, captured=captured):
                table = decode_vectors(batch_table(ids, captured, "last", lengths, dtype))
                pq.write_table(
                    table, tmp / "l.parquet", compression="none", use_dictionary=["prompt_id"]
                )
                _fsynced(tmp / "l.parquet")

            t_np, t_pq, t_list = (_best(f) for f in (npsave, parquet, listed))
            mb = arr.nbytes / 1e6
            out[np.dtype(dtype).name] = {
                "npsave_mb_s": mb / t_np,
                "parquet_mb_s": mb / t_pq,
                "ratio": t_np / t_pq,
                "list_ratio": t_np / t_list,
                "parquet_file_mb": (tmp / "p.parquet").stat().st_size / 1e6,
            }
    return out
