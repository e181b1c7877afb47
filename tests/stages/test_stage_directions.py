"""The directions stage as a pure function on tiny planted artifacts (no model)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlx_interp.analysis.directions import DirectionError, DirectionSet
from mlx_interp.engine.schema import DirectionsConfig, ModelConfig
from mlx_interp.stages import directions as stage

D, N = 48, 200


def _artifacts(tmp_path, shift: float):
    rng = np.random.default_rng(0)
    planted = rng.standard_normal(D)
    planted /= np.linalg.norm(planted)
    ids, conds, rows = [], [], []
    for i in range(2 * N):
        cond = "red" if i % 2 else "green"
        ids.append(f"p{i}")
        conds.append(cond)
    prompts = pd.DataFrame({"prompt_id": ids, "condition": conds, "split": "train"})
    (tmp_path / "prompts").mkdir()
    prompts.to_parquet(tmp_path / "prompts" / "prompts.parquet")
    for layer in (0, 1):
        for pid, cond in zip(ids, conds, strict=True):
            sign = 1 if cond == "red" else -1
            vec = rng.standard_normal(D) + sign * shift * layer * planted
            rows.append((pid, layer, 5, vec.astype(np.float32)))
    flat = np.stack([r[3] for r in rows]).reshape(-1)
    table = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "layer": pa.array([r[1] for r in rows], pa.int16()),
            "position": pa.array([r[2] for r in rows], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat), D),
        }
    )
    (tmp_path / "capture" / "activations").mkdir(parents=True)
    pq.write_table(table, tmp_path / "capture" / "activations" / "part-00000.parquet")
    return {"prompts": tmp_path / "prompts", "capture": tmp_path / "capture"}, planted


CFG = stage.DirectionsInputs(
    directions=DirectionsConfig(
        method={"_target_": "mlx_interp.analysis.directions.MeanDiff"},
        contrast={"pos": "red", "neg": "green"},
        fit_split="all",
        compare_methods=True,
    ),
    seed=0,
    model=ModelConfig(),  # not read: the site is the captured last token
)


def test_planted_direction_is_found_where_it_is_planted(tmp_path):
    inputs, planted = _artifacts(tmp_path, shift=3.0)
    out = tmp_path / "out"
    out.mkdir()
    summary = stage.run(CFG, inputs, out)
    ds = DirectionSet.load(out / "directions.safetensors")
    assert ds.contrast == ("red", "green") and ds.layers == [0, 1]
    assert ds.unit(1) @ planted > 0.99  # layer 1 carries the concept
    info = json.loads((out / "directions.json").read_text())
    assert info["per_layer"]["1"]["cv_accuracy"] > 0.95
    assert info["per_layer"]["0"]["cv_accuracy"] < 0.75  # layer 0 is noise
    assert info["per_layer"]["1"]["cosine_to"]["pca"] > 0.95
    assert summary["best_separated_layer"] == 1


def test_unknown_contrast_condition_is_a_clear_error(tmp_path):
    inputs, _ = _artifacts(tmp_path, shift=1.0)
    cfg = dataclasses.replace(
        CFG,
        directions=dataclasses.replace(CFG.directions, contrast={"pos": "blue", "neg": "green"}),
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(DirectionError, match="'blue' has no prompts"):
        stage.run(cfg, inputs, tmp_path / "out")
