"""Stage `directions`: activations + a contrast (pos vs neg condition) -> one direction per layer.

``directions.site`` says where the activations are read (stages/direction_sites.py): the last
prompt token (the capture artifact), the object's tokens or the answer contrast (read from the
model). The direction set's metadata records the site.

Writes directions.safetensors (the chosen method's DirectionSet) and directions.json: per
layer the direction norm, the separability of the two conditions along it (d' and a 5-fold
cross-validated threshold accuracy), and the cosines between the three methods.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlx_interp.analysis.directions import (
    METHODS,
    DirectionError,
    DirectionSet,
    extract,
    make_method,
)
from mlx_interp.engine.dag import Stage
from mlx_interp.engine.schema import DirectionsConfig, ModelConfig
from mlx_interp.io.activations import activation_matrix, read_activations
from mlx_interp.models.loading import load_model, model_fingerprint
from mlx_interp.stages.direction_sites import SITE_NOTES, site_activations


@dataclass(frozen=True)
class DirectionsInputs:
    directions: DirectionsConfig
    seed: int
    model: ModelConfig  # read when the site is not the captured last token


def separability(x: np.ndarray, is_pos: np.ndarray, unit: np.ndarray, seed: int) -> dict:
    """d' of the projections on ``unit`` and 5-fold CV accuracy of a midpoint threshold."""
    proj = x @ unit
    pos, neg = proj[is_pos], proj[~is_pos]
    pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2)
    d_prime = float((pos.mean() - neg.mean()) / pooled) if pooled > 0 else float("inf")
    rng = np.random.default_rng(seed)
    folds = rng.permutation(len(x)) % 5
    correct = 0
    for k in range(5):
        train, test = folds != k, folds == k
        mu_pos = x[train & is_pos].mean(0) if (train & is_pos).any() else None
        mu_neg = x[train & ~is_pos].mean(0) if (train & ~is_pos).any() else None
        if mu_pos is None or mu_neg is None:
            continue
        w = mu_pos - mu_neg
        threshold = (mu_pos + mu_neg) / 2 @ w
        correct += int(((x[test] @ w > threshold) == is_pos[test]).sum())
    return {"d_prime": d_prime, "cv_accuracy": correct / len(x)}


def fingerprint(inputs: DirectionsInputs) -> dict:
    """The model matters when the activations are read from it (sites other than last)."""
    if inputs.directions.site == "last":
        return {}
    return {"model": model_fingerprint(inputs.model)}


def split_problem(prompts: pd.DataFrame, split: str) -> None:
    """A fit split no prompt is in: say why (the dataset marks every row) and how to fix it."""
    present = sorted(set(prompts["split"]))
    if split in present:
        return
    raise DirectionError(
        f"directions.fit_split={split} but every prompt is in split {present[0]!r}, none in "
        f"{split!r} (a row's split is its `split` key; rows without one are train, and "
        f"prompts.test_fraction marks a share of those test): mark some rows split: {split}, "
        "set prompts.test_fraction, or set directions.fit_split=all"
    )


def run(inputs: DirectionsInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: a direction per layer; needs prompts and capture."""
    dcfg = inputs.directions
    pos_name, neg_name = dcfg.contrast["pos"], dcfg.contrast["neg"]
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    if dcfg.fit_split != "all":
        split_problem(prompts, dcfg.fit_split)
        prompts = prompts[prompts["split"] == dcfg.fit_split]
    prompts = prompts[prompts["condition"].isin([pos_name, neg_name])]
    for name in (pos_name, neg_name):
        if not (prompts["condition"] == name).any():
            raise DirectionError(
                f"condition {name!r} has no prompts (split {dcfg.fit_split!r}); fix "
                "directions.contrast or the dataset"
            )
    site = dcfg.site
    if site == "last":
        ids = prompts["prompt_id"].tolist()
        acts = activation_matrix(read_activations(upstream["capture"]), ids)
        is_pos = (prompts["condition"] == pos_name).to_numpy()
        is_neg = (prompts["condition"] == neg_name).to_numpy()
    else:
        lm = load_model(inputs.model)  # every layer, read here (the capture is not used)
        acts, is_pos, is_neg = site_activations(lm, prompts, site, pos_name, neg_name, None)
    contrast = (pos_name, neg_name)
    main = extract(acts, is_pos, is_neg, make_method(dcfg.method), contrast)
    main.meta.update(
        {
            "prompt_ids": len(prompts),
            "fit_split": dcfg.fit_split,
            "site": site,
            "measured_at": SITE_NOTES[site],
        }
    )
    main.save(out / "directions.safetensors")
    others: dict[str, DirectionSet] = {}
    if dcfg.compare_methods:
        others = {name: extract(acts, is_pos, is_neg, name, contrast) for name in METHODS}
    per_layer = {}
    for layer in main.layers:
        entry: dict[str, Any] = {"norm": main.norms()[layer]}
        entry.update(
            separability(
                acts[layer][is_pos | is_neg],
                is_pos[is_pos | is_neg],
                main.unit(layer),
                inputs.seed,
            )
        )
        entry["cosine_to"] = {n: main.cosine(s, layer) for n, s in others.items()}
        per_layer[layer] = entry
    summary = {
        "method": main.method,
        "contrast": list(contrast),
        "n_pos": int(is_pos.sum()),
        "n_neg": int(is_neg.sum()),
        "layers": main.layers,
        "site": site,
        "measured_at": SITE_NOTES[site],
        "fit_split": dcfg.fit_split,
    }
    (out / "directions.json").write_text(
        json.dumps({**summary, "per_layer": per_layer}, indent=2), encoding="utf-8"
    )
    best = max(per_layer, key=lambda k: per_layer[k]["d_prime"])
    return {**summary, "best_separated_layer": best}


STAGE = Stage(
    name="directions",
    run=run,
    inputs=DirectionsInputs,
    needs=("prompts", "capture"),
    fingerprint=fingerprint,
    writes=("directions.safetensors", "directions.json"),
)
