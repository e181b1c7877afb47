"""The recorded steering sweep on TRAIN questions only: which (site, positions, layer, alpha).

    python -m mlx_interp.apps.steer_sweep [--out docs/notes/color_swap_sweep.csv] [key=value ...]

composes the default config (overrides as for ``mlx-interp``), builds the prompts, keeps the
``train`` split, fits one mean-difference direction per measurement site on the train
green/red questions, and scores every grid point with the logit scorer on the train swap
questions and train controls (cross-validated, below). Per point: the swap rate of each
class among the questions the unsteered model answers right, the bidirectional rate (the
lower one) and the control bleed
(controls whose top token becomes a swap word). The best points by the selection rule then
get random directions of equal norm at the same positions and open-ended answers for the
loop rate (train questions). The test split is never read.

Every grid point is scored by cross-validation inside the train split (``FOLDS`` folds,
stratified): a question is steered with the direction fitted on the other folds, so the
ranking favours settings that carry to questions the direction has not seen. (The first
recorded sweep scored the train questions with the direction fitted on them; its pick swapped
81% in-sample and 36% held out: see docs/notes/color_swap.md.)

Selection: the highest bidirectional rate with bleed <= ``--max-bleed``, random <= 0.10 and
loop rate < 0.05; ties go to the smaller alpha.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mlx_interp.analysis.directions import MeanDiff, extract
from mlx_interp.analysis.fluency import fluency
from mlx_interp.analysis.scoring import UNSTEERED, GenerateScorer, LogitScorer, Steering
from mlx_interp.interventions.positions import object_spans
from mlx_interp.interventions.steering import LayerEdit, make_mode
from mlx_interp.io.prompts import render
from mlx_interp.models.loading import load_model
from mlx_interp.resources import CONF_DIR
from mlx_interp.stages.direction_sites import site_activations
from mlx_interp.stages.prompts import build_prompts, read_datasets

# (site, positions, layers, alphas): where the first probes (docs/notes/color_swap.md) found
# effects, plus the old default (all positions) for comparison.
GRID = [
    ("object", "object", [2, 4, 8, 12, 16, 18, 20], [2.0, 3.0, 4.0]),
    ("last", "last", [24, 28], [2.0, 3.0]),
]
FOLDS = 3  # cross-validation inside the train split: each fold scored with a direction
# fitted on the other folds, so the sweep ranks settings by how they carry to new questions


def fold_of(conditions: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row, stratified by condition (seeded)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(conditions), int)
    for c in sorted(set(conditions)):
        idx = np.flatnonzero(conditions == c)
        out[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return out


def steered_rows(lm, table, rows, steering, spans, words) -> tuple[np.ndarray, np.ndarray]:
    """(swapped [rows], top word [rows]) of ``table``'s ``rows`` under ``steering``."""
    swap = {"green": "red", "red": "green"}
    cond = table["condition"].to_numpy()[rows]
    original = [c if c in swap else words[0] for c in cond]
    target = [swap.get(c, words[-1]) for c in cond]
    tokens = [list(map(int, table["tokens"].iloc[i])) for i in rows]
    res = pd.DataFrame(
        LogitScorer(32)(
            lm, tokens, original, target, words, steering, lm.pad_id, spans=[spans[i] for i in rows]
        )
    )
    return res["margin"].to_numpy() > 0, res["top_word"].to_numpy()


def summarize(cond, right, base_top, swapped, top, words) -> dict:
    """Per-class swap rates among unsteered-right swap questions, and control bleed."""
    out = {}
    for c in words:
        ok = right & (cond == c)
        out[f"swap_{c}"] = float(swapped[ok].mean())
    out["bidirectional"] = min(out[f"swap_{c}"] for c in words)
    ctrl = ~np.isin(cond, words)
    became = np.isin(top, words) & ~np.isin(base_top, words)
    out["bleed"] = float(became[ctrl].mean()) if ctrl.any() else float("nan")
    return out


def cv_point(lm, table, fold, fold_sets, site, positions, layer, alpha, spans, words, mode):
    """(swapped [n], top [n]): each fold scored with the direction fitted without it."""
    swapped = np.zeros(len(table), bool)
    top = np.empty(len(table), object)
    for f, sets in enumerate(fold_sets):
        ds = sets[site]
        rows = np.flatnonzero(fold == f)
        edit = (LayerEdit(layer, ds.vectors[layer], ds.center(layer)),)
        got = steered_rows(lm, table, rows, Steering(edit, mode, alpha, positions), spans, words)
        swapped[rows], top[rows] = got
    return swapped, top


def loop_rate(lm, table, steering, n: int = 6) -> float:
    """Share of open-ended steered answers (n train questions) that end in a loop."""
    picks = np.unique(np.linspace(0, len(table) - 1, n).round().astype(int))
    sample = table.iloc[picks]
    texts = [f"{t} Describe it in two or three sentences." for t in sample["text"]]
    tokens = [render(lm.tokenizer, t, "chat", None, [])[1] for t in texts]
    spans = None
    if steering.positions == "object":
        spans = object_spans(lm.tokenizer, tokens, sample["meta"].tolist())
    rows = GenerateScorer(32)(
        lm,
        tokens,
        ["green"] * len(tokens),
        ["red"] * len(tokens),
        ["green", "red"],
        steering,
        lm.pad_id,
        spans=spans,
    )
    return float(np.mean([fluency(r["token_ids"]).loop for r in rows]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/notes/color_swap_sweep.csv")
    parser.add_argument("--max-bleed", type=float, default=0.10)
    parser.add_argument("--top", type=int, default=6, help="points checked for random/loops")
    parser.add_argument("--n-random", type=int, default=3)
    parser.add_argument("--loop-prompts", type=int, default=20, help="open-ended train answers")
    parser.add_argument("--grid-from", help="a sweep CSV whose grid rows are reused (no rescoring)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mlx_interp.engine.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(
            compose("config", overrides=["experiment=color_swap", *args.overrides]), resolve=True
        )
    start = time.perf_counter()
    lm = load_model(cfg["model"])
    df, _ = read_datasets(cfg["concept"])
    prompts = build_prompts(df, cfg["concept"], cfg["prompts"], lm.tokenizer, int(cfg["seed"]))
    train = prompts[prompts["split"] == "train"].reset_index(drop=True)
    words = ["green", "red"]
    fit = train[train["condition"].isin(words)].reset_index(drop=True)
    table = train[train["condition"].isin([*words, "control"])].reset_index(drop=True)
    tokens = [list(map(int, t)) for t in table["tokens"]]
    spans = object_spans(lm.tokenizer, tokens, table["meta"].tolist())
    cond = table["condition"].to_numpy()
    base = pd.DataFrame(
        LogitScorer(32)(
            lm,
            tokens,
            [c if c in words else "green" for c in cond],
            [{"green": "red", "red": "green"}.get(c, "red") for c in cond],
            words,
            UNSTEERED,
            lm.pad_id,
        )
    )
    right = base["margin"].to_numpy() < 0
    base_top = base["top_word"].to_numpy()
    print(
        f"train: {len(fit)} swap questions, {int(right[np.isin(cond, words)].sum())} right "
        f"unsteered, {int((cond == 'control').sum())} controls",
        flush=True,
    )
    fold = fold_of(cond, FOLDS, int(cfg["seed"]))
    is_fit = np.isin(cond, words)
    sets, fold_sets = {}, [{} for _ in range(FOLDS)]
    for site in sorted({g[0] for g in GRID}):
        acts, is_pos, is_neg = site_activations(lm, fit, site, "red", "green")
        sets[site] = extract(acts, is_pos, is_neg, MeanDiff(), ("red", "green"))
        per_row = len(is_pos) // len(fit)  # 2 rows per question for the answer contrast
        fit_fold = np.repeat(fold[is_fit], per_row)
        for f in range(FOLDS):
            keep = fit_fold != f
            sub = {k: v[keep] for k, v in acts.items()}
            fold_sets[f][site] = extract(
                sub, is_pos[keep], is_neg[keep], MeanDiff(), ("red", "green")
            )
    mode = make_mode("reflect")
    rows = []
    grid = [] if args.grid_from else GRID
    if args.grid_from:
        rows = pd.read_csv(args.grid_from)[
            [
                "site",
                "positions",
                "layer",
                "alpha",
                "swap_green",
                "swap_red",
                "bidirectional",
                "bleed",
                "seconds",
            ]
        ].to_dict("records")
    for site, positions, layers, alphas in grid:
        for layer in layers:
            for alpha in alphas:
                t = time.perf_counter()
                swapped, top = cv_point(
                    lm, table, fold, fold_sets, site, positions, layer, alpha, spans, words, mode
                )
                got = summarize(cond, right, base_top, swapped, top, words)
                rows.append(
                    {
                        "site": site,
                        "positions": positions,
                        "layer": layer,
                        "alpha": alpha,
                        **got,
                        "seconds": time.perf_counter() - t,
                    }
                )
                pd.DataFrame(rows).to_csv(args.out + ".partial", index=False)
                print(
                    " ".join(
                        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in rows[-1].items()
                    ),
                    flush=True,
                )
    sweep = pd.DataFrame(rows)
    sweep["random"] = np.nan
    sweep["loops"] = np.nan
    ok = sweep[sweep["bleed"] <= args.max_bleed]
    top_points = ok.sort_values(["bidirectional", "alpha"], ascending=[False, True]).head(args.top)
    everyone = np.arange(len(table))
    for i, point in top_points.iterrows():
        ds = sets[point["site"]]
        layer, alpha = int(point["layer"]), float(point["alpha"])
        rates = []
        for rnd in ds.random_like(args.n_random, seed=int(cfg["seed"])):
            edit = (LayerEdit(layer, rnd.vectors[layer], rnd.center(layer)),)
            steering = Steering(edit, mode, alpha, point["positions"])
            swapped, top = steered_rows(lm, table, everyone, steering, spans, words)
            got = summarize(cond, right, base_top, swapped, top, words)
            rates.append((got["swap_green"] + got["swap_red"]) / 2)
        edit = (LayerEdit(layer, ds.vectors[layer], ds.center(layer)),)
        steering = Steering(edit, mode, alpha, point["positions"])
        sweep.loc[i, "random"] = float(np.mean(rates))
        sweep.loc[i, "loops"] = loop_rate(lm, fit, steering, args.loop_prompts)
        print(sweep.loc[i].to_dict(), flush=True)
    good = sweep[
        (sweep["bleed"] <= args.max_bleed) & (sweep["random"] <= 0.10) & (sweep["loops"] < 0.05)
    ]
    best = good.sort_values(["bidirectional", "alpha"], ascending=[False, True]).head(1)
    sweep["chosen"] = sweep.index.isin(best.index)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sweep.to_csv(args.out, index=False, float_format="%.4g")
    print(f"chosen: {best.to_dict('records')}; {time.perf_counter() - start:.0f} s; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
