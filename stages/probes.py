"""Stage `probes`: activations + labels -> per-layer probe accuracy, transfer and cosines.

Writes
- probes.parquet: one row per (contrast, layer): k-fold CV accuracy mean/sd, the fold scores,
  the permutation p-value, the chance threshold (binomial, level ``probes.alpha``);
- transfer.parquet: one row per (contrast, layer, scored condition): the share of that
  condition's prompts the contrast's probe calls positive, with its Wilson CI (training
  conditions scored by cross-validated predictions, never by the probe that saw them);
- cosines.parquet: per layer, the cosine between every two named mean-difference directions,
  with a bootstrap CI over prompts and a split-half reliability reference;
- probes.safetensors: each binary contrast's probe fitted on all its rows, as raw-space
  weights "{contrast}/{layer}/coef" [d] and "{contrast}/{layer}/intercept" [1]
  (p = sigmoid(h @ coef + intercept)), for conditional steering;
- probes.json: the summary (best layer per contrast, settings).

Probes run single-threaded in BLAS: scikit-learn's many small fits are slower when every
fit spreads over all cores, and the numbers do not depend on it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mlx_interp.analysis.probes import (
    ProbeError,
    cross_validate_layer,
    linear_weights,
    make_probe,
    mean_diff_cosines,
    permutation_threshold,
    transfer_cv,
)
from mlx_interp.analysis.stats import wilson_interval
from mlx_interp.engine.dag import Stage
from mlx_interp.engine.schema import ProbesConfig
from mlx_interp.io.activations import layer_matrices


@dataclass(frozen=True)
class ProbesInputs:
    probes: ProbesConfig
    seed: int


def contrasts_from_config(pcfg: ProbesConfig, conditions: list[str]) -> dict[str, dict]:
    """name -> {pos: [...], neg: [...], kind}: the pairwise, named and multiclass contrasts."""
    out: dict[str, dict] = {}
    pairs = pcfg.pairs
    if pairs == "all":
        pairs = list(itertools.combinations(conditions, 2))
    elif isinstance(pairs, str) or pairs is None:
        raise ProbeError(f"probes.pairs must be 'all' or a list of [a, b], not {pairs!r}")
    for pair in pairs:
        if len(pair) != 2:
            raise ProbeError(f"probes.pairs entries are [a, b], got {list(pair)}")
        a, b = pair
        out[f"{a}_vs_{b}"] = {"pos": [a], "neg": [b], "kind": "pair"}
    for name, spec in pcfg.contrasts.items():
        if not hasattr(spec, "keys") or "pos" not in spec or "neg" not in spec:
            raise ProbeError(f"probes.contrasts.{name} needs pos: [...] and neg: [...]")
        pos = [spec["pos"]] if isinstance(spec["pos"], str) else list(spec["pos"])
        neg = [spec["neg"]] if isinstance(spec["neg"], str) else list(spec["neg"])
        out[str(name)] = {"pos": pos, "neg": neg, "kind": "contrast"}
    multi = list(pcfg.multiclass)
    if multi:
        if len(multi) < 3:
            raise ProbeError("probes.multiclass needs at least 3 conditions (use pairs for 2)")
        out["multiclass"] = {"classes": multi, "kind": "multiclass"}
    for name, spec in out.items():
        used = spec.get("classes") or spec["pos"] + spec["neg"]
        unknown = [c for c in used if c not in conditions]
        if unknown:
            raise ProbeError(
                f"probe contrast {name!r} names condition(s) {unknown} that are not in the "
                f"prompts (conditions: {conditions}); fix probes.* or concept.conditions"
            )
    return out


def _by_condition(x: np.ndarray, conds: np.ndarray) -> dict[str, np.ndarray]:
    return {c: x[conds == c] for c in dict.fromkeys(conds.tolist())}


def run(inputs: ProbesInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: probes per contrast and layer; needs prompts and capture."""
    from safetensors.numpy import save_file
    from threadpoolctl import threadpool_limits

    pcfg, seed = inputs.probes, inputs.seed
    k, n_perm, alpha = pcfg.folds, pcfg.n_permutations, pcfg.alpha
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    ids = prompts["prompt_id"].tolist()
    conds = prompts["condition"].to_numpy().astype(str)
    conditions = list(dict.fromkeys(conds.tolist()))
    contrasts = contrasts_from_config(pcfg, conditions)
    transfer = dict(pcfg.transfer)
    unknown = [c for c in transfer if c not in contrasts or contrasts[c]["kind"] == "multiclass"]
    if unknown:
        raise ProbeError(
            f"probes.transfer names contrast(s) {unknown}; binary contrasts: "
            f"{[n for n, s in contrasts.items() if s['kind'] != 'multiclass']}"
        )
    directions = {str(n): (str(s["pos"]), str(s["neg"])) for n, s in pcfg.directions.items()}
    probe = make_probe(pcfg.probe)
    layers, acts = layer_matrices(upstream["capture"], pcfg.layers, ids)

    rows, transfer_rows, cosine_rows, weights = [], [], [], {}
    fits = len(contrasts) * len(layers) + (len(layers) if directions else 0)
    bar = tqdm(total=fits, desc="probes", unit="layer", leave=False)  # permutations: the bulk
    with threadpool_limits(limits=1), bar:
        for name, spec in contrasts.items():
            bar.set_postfix_str(name)
            classes = spec.get("classes") or spec["pos"] + spec["neg"]
            mask = np.isin(conds, classes)
            if spec["kind"] == "multiclass":
                y = conds[mask]
            else:
                y = np.where(np.isin(conds[mask], spec["pos"]), "pos", "neg")
            counts = dict(zip(*np.unique(y, return_counts=True), strict=True))
            threshold = permutation_threshold(counts, alpha)
            for layer in layers:
                res = cross_validate_layer(
                    acts[layer][mask],
                    y,
                    k=k,
                    seed=seed,
                    n_permutations=n_perm,
                    probe=probe,
                    layer=layer,
                )
                bar.update()
                rows.append(
                    {
                        "contrast": name,
                        "kind": spec["kind"],
                        "pos": ",".join(spec.get("pos", classes)),
                        "neg": ",".join(spec.get("neg", [])),
                        "layer": layer,
                        "n": int(mask.sum()),
                        "accuracy_mean": res.accuracy_mean,
                        "accuracy_sd": res.accuracy_sd,
                        "fold_scores": list(res.fold_scores),
                        "permutation_p": res.permutation_p,
                        "n_permutations": res.n_permutations,
                        "chance_threshold": threshold,
                    }
                )
                if spec["kind"] == "multiclass":
                    continue
                score_on = transfer.get(name) or []
                results, model = transfer_cv(
                    _by_condition(acts[layer], conds),
                    spec["pos"],
                    spec["neg"],
                    score_on,
                    k=k,
                    seed=seed,
                    probe=probe,
                )
                for r in results:
                    lo, hi = wilson_interval(r.n_positive, r.n)
                    transfer_rows.append(
                        {
                            "contrast": name,
                            "layer": layer,
                            "condition": r.condition,
                            "n": r.n,
                            "n_positive": r.n_positive,
                            "fraction_positive": r.fraction,
                            "lo": lo,
                            "hi": hi,
                            "in_training": r.in_training,
                        }
                    )
                try:
                    coef, intercept = linear_weights(model)
                except ProbeError:
                    continue  # a custom probe that is not linear: no weights to export
                weights[f"{name}/{layer}/coef"] = coef.astype(np.float32)
                weights[f"{name}/{layer}/intercept"] = np.array([intercept], dtype=np.float32)
        if directions:
            bar.set_postfix_str("cosines")
            for layer in layers:
                bar.update()
                for row in mean_diff_cosines(
                    _by_condition(acts[layer], conds),
                    directions,
                    n_bootstrap=pcfg.n_bootstrap,
                    seed=seed,
                ):
                    cosine_rows.append({"layer": layer, **row})

    table = pd.DataFrame(rows)
    table.to_parquet(out / "probes.parquet", index=False)
    pd.DataFrame(
        transfer_rows,
        columns=[
            "contrast",
            "layer",
            "condition",
            "n",
            "n_positive",
            "fraction_positive",
            "lo",
            "hi",
            "in_training",
        ],
    ).to_parquet(out / "transfer.parquet", index=False)
    pd.DataFrame(
        cosine_rows,
        columns=["layer", "a", "b", "cosine", "lo", "hi", "split_half_a", "split_half_b"],
    ).to_parquet(out / "cosines.parquet", index=False)
    if weights:
        save_file(weights, str(out / "probes.safetensors"), metadata={"format": "raw-linear"})
    best = {}
    for name, group in table.groupby("contrast", sort=False):
        # best layer: highest mean accuracy, ties to the earlier layer (as probes.best_layer)
        row = group.sort_values(["accuracy_mean", "layer"], ascending=[False, True]).iloc[0]
        layer = int(row["layer"])
        best[name] = {
            "layer": layer,
            "accuracy_mean": float(row["accuracy_mean"]),
            "accuracy_sd": float(row["accuracy_sd"]),
            "permutation_p": float(row["permutation_p"]),
            "chance_threshold": float(row["chance_threshold"]),
            "n": int(row["n"]),
        }
    summary = {
        "folds": k,
        "n_permutations": n_perm,
        "alpha": alpha,
        "layers": layers,
        "conditions": conditions,
        "contrasts": contrasts,
        "transfer": transfer,
        "directions": {n: list(v) for n, v in directions.items()},
        "best": best,
    }
    (out / "probes.json").write_text(json.dumps(summary, indent=2))
    return {"contrasts": list(contrasts), "layers": len(layers), "best": best}


STAGE = Stage(
    name="probes",
    run=run,
    inputs=ProbesInputs,
    needs=("prompts", "capture"),
    writes=("probes.parquet", "transfer.parquet", "cosines.parquet", "probes.json"),
)
