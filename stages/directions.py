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
from mlx_interp.analysis.settings import head_effects, keep_heads, top_heads
from mlx_interp.analysis.sides import side_labels
from mlx_interp.analysis.sweep import SITE_KIND, fold_of
from mlx_interp.engine.dag import Stage
from mlx_interp.engine.inputs import typed
from mlx_interp.engine.schema import DirectionsConfig, GateConfig, ModelConfig
from mlx_interp.interventions.sites import head_shape
from mlx_interp.io.activations import activation_matrix, read_activations
from mlx_interp.models.loading import load_model, model_fingerprint
from mlx_interp.stages.direction_sites import (
    SITE_NOTES,
    answer_axis_set,
    read_at,
    role_spans,
    side_reader,
    site_activations,
)


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
    d = inputs.directions
    if d.site == "last" and d.kind == "resid" and d.gate is None and d.method != "unembed":
        return {}
    return {"model": model_fingerprint(inputs.model)}


def restricted(lm, ds: DirectionSet, kind: str, heads) -> tuple[DirectionSet, dict]:
    """``ds`` (read at site ``kind``) restricted to some heads (``directions.heads``: k per
    layer by their share of the class difference, or a list); its metadata."""
    extra: dict[str, Any] = {"kind": str(kind)}
    if kind != "heads" or heads is None:
        return ds, extra
    vectors, chosen = {}, {}
    for layer in ds.layers:
        n_heads = head_shape(lm.model, layer)[0]
        if isinstance(heads, int):
            keep = top_heads(head_effects(lm.model, layer, ds.vectors[layer]), heads)
        else:
            keep = tuple(int(h) for h in heads)
        one = DirectionSet(
            {layer: ds.vectors[layer]},
            {layer: ds.pos_means[layer]},
            {layer: ds.neg_means[layer]},
            ds.method,
            ds.contrast,
        )
        vectors[layer] = keep_heads(one, keep, n_heads).vectors[layer]
        chosen[layer] = list(keep)
    extra["heads"] = chosen
    out = DirectionSet(vectors, ds.pos_means, ds.neg_means, ds.method, ds.contrast, dict(ds.meta))
    return out, extra


def fit_gate(lm, prompts: pd.DataFrame, gate, contrast, out: Path) -> dict:
    """The side reader of ``directions.gate`` (a logistic probe, or the answer words' axis)
    fitted on ``prompts`` (every condition of the fitting split: rows of neither class are
    ``other``), written as gate.safetensors; its 5-fold cross-validated accuracy on the two
    classes' rows, for the record."""
    tokens = [list(map(int, t)) for t in prompts["tokens"]]
    x = read_at(lm, tokens, role_spans(lm, prompts, gate.measured), [gate.layer])[gate.layer]
    labels = side_labels(prompts["condition"].to_numpy(), *contrast)
    folds = fold_of(labels, 5, 0)
    predicted = np.empty(len(labels), object)
    for f in range(5):
        part = side_reader(lm, gate.method, gate.C, contrast)
        predicted[folds == f] = part.fit(x[folds != f], labels[folds != f]).predict(x[folds == f])
    side_reader(lm, gate.method, gate.C, contrast).fit(x, labels).save(out / "gate.safetensors")
    two = labels != "other"
    return {
        "measured": str(gate.measured),
        "layer": int(gate.layer),
        "method": str(gate.method),
        "C": float(gate.C),
        "cv_accuracy": float((predicted == labels)[two].mean()),
    }


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
    fit_prompts = prompts.reset_index(drop=True)  # every condition: a gate also reads others
    prompts = prompts[prompts["condition"].isin([pos_name, neg_name])]
    for name in (pos_name, neg_name):
        if not (prompts["condition"] == name).any():
            raise DirectionError(
                f"condition {name!r} has no prompts (split {dcfg.fit_split!r}); fix "
                "directions.contrast or the dataset"
            )
    site, kind = dcfg.site, dcfg.kind
    if site == "last" and kind == "resid":
        ids = prompts["prompt_id"].tolist()
        acts = activation_matrix(read_activations(upstream["capture"]), ids)
        is_pos = (prompts["condition"] == pos_name).to_numpy()
        is_neg = (prompts["condition"] == neg_name).to_numpy()
    else:
        lm = load_model(inputs.model)  # every layer, read here (the capture is not used)
        layers = None if kind == "resid" else list(range(lm.n_layers))
        acts, is_pos, is_neg = site_activations(
            lm, prompts, site, pos_name, neg_name, layers, SITE_KIND[str(kind)]
        )
    contrast = (pos_name, neg_name)
    if dcfg.method == "unembed":  # the answer words' axis, centred at the class midpoint
        mean_diff = extract(acts, is_pos, is_neg, make_method("mean_diff"), contrast)
        main = answer_axis_set(load_model(inputs.model), mean_diff)
    else:
        main = extract(acts, is_pos, is_neg, make_method(dcfg.method), contrast)
    main.meta.update(
        {
            "prompt_ids": len(prompts),
            "fit_split": dcfg.fit_split,
            "site": site,
            "measured_at": SITE_NOTES[site],
        }
    )
    # what only a non-default setting writes (the default's files stay as they were)
    extra: dict[str, Any] = {}
    if kind != "resid":
        main, extra = restricted(lm, main, kind, dcfg.heads)
    if dcfg.gate is not None:
        gate = typed(GateConfig, dcfg.gate, "directions.gate.")
        extra["gate"] = fit_gate(load_model(inputs.model), fit_prompts, gate, contrast, out)
    main.meta.update(extra)
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
        **extra,
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
