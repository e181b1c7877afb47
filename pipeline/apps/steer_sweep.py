"""The recorded steering sweep on TRAIN questions only: which (site, method, positions,
layers, alpha).

    python -m mlx_interp.apps.steer_sweep [--out docs/notes/color_swap_sweep.csv]
        [--grid "site/method/positions/layers/alphas;..."] [key=value ...]

composes the default config (overrides as for ``mlx-interp``, e.g. ``model=gemma3_270m``),
builds the prompts, keeps the ``train`` split, fits one direction per (measurement site,
method) on the train green/red questions, and scores every grid point with the logit scorer
on the train swap
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
loops below 5% or no more than the unsteered model's loop rate on the same answers (steering
must not make the answers loop more than the model does anyway: SmolLM2 loops on 2 of its 20
train answers unsteered, Gemma 3 270M, a base model, on 3); ties go to the smaller alpha.
Random directions and loops are costly, so they are checked in rank order (by
bidirectional rate, among points within the bleed bound) until the first point that passes,
and at least ``--top`` points; ``--grid-from`` reuses a recorded sweep's rows and its checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from mlx_interp.analysis.directions import (
    DirectionSet,
    LogisticDirection,
    MeanDiff,
    PCADiff,
    extract,
)
from mlx_interp.analysis.fluency import fluency
from mlx_interp.analysis.lens import answer_direction
from mlx_interp.analysis.scoring import (
    UNSTEERED,
    GenerateScorer,
    LogitScorer,
    Steering,
    word_token_ids,
)
from mlx_interp.engine.inputs import typed
from mlx_interp.engine.schema import STEER_POSITIONS as POSITIONS
from mlx_interp.engine.schema import RootConfig, ScoreConfig
from mlx_interp.errors import ConfigError, MlxInterpError, UntrustedResultError, report_error
from mlx_interp.interventions.positions import object_spans
from mlx_interp.interventions.steering import LayerEdit, make_mode
from mlx_interp.models.loading import load_model
from mlx_interp.resources import CONF_DIR
from mlx_interp.stages.direction_sites import SITES, site_activations
from mlx_interp.stages.prompts import build_prompts, prompts_config, read_datasets
from mlx_interp.stages.report_plots import plot_sweep_frontier
from mlx_interp.stages.steer import fluency_prompts, fluency_spec

# Grid rows "site/method/positions/layers/alphas": layers is a comma list, and a point that
# edits several layers at once joins them with "+" (23+24+25). Methods: mean_diff, pca,
# logistic (C=0.1), unembed (the answer words' unembedding through the final norm,
# :func:`mlx_interp.analysis.lens.answer_direction`, scaled to the mean difference; centered
# at the class midpoint like the others). Per model (docs/notes/color_swap.md says why).
GRIDS = {
    "smollm2_135m": (
        "object/mean_diff/object/2,4,8,12,16,18,20/2,3,4;"
        "last/mean_diff/last/23,24,25,26,28/2,3,5;"
        "last/pca/last/24,26/2,3;"
        "last/logistic/last/24,26/2,3;"
        "last/unembed/last/24,25,26,28/2,3,5;"
        "answer/mean_diff/last/24,26/2,3;"
        "last/mean_diff/last/23+24+25/2,3"
    ),
    "gemma3_270m": (  # patching: the colour leaves the object's tokens at layer 12
        "object/mean_diff/object/3,7,11/2,3,5;"
        "last/mean_diff/last/12,13,14,16/2,3,5;"
        "last/pca/last/12,14/3;"
        "last/unembed/last/12,14,16/3,5"
    ),
}
METHODS = ("mean_diff", "pca", "logistic", "unembed")
KEYS = ["site", "method", "positions", "layer", "alpha"]
FOLDS = 3  # cross-validation inside the train split: each fold scored with a direction
# fitted on the other folds, so the sweep ranks settings by how they carry to new questions


def default_grid(model_name: str) -> str:
    if model_name not in GRIDS:
        raise ConfigError(
            f"no recorded grid for model {model_name!r} (known: {sorted(GRIDS)}): pass "
            "--grid 'site/method/positions/layers/alphas;...', e.g. last/mean_diff/last/12,14/2,3"
        )
    return GRIDS[model_name]


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


def parse_grid(text: str) -> list[tuple[str, str, str, tuple[int, ...], float]]:
    """Points (site, method, positions, layers, alpha) of a grid text (see :data:`GRIDS`)."""
    points = []
    for row in filter(None, (r.strip() for r in text.split(";"))):
        parts = row.split("/")
        if len(parts) != 5:
            raise ConfigError(
                f"grid row {row!r}: write site/method/positions/layers/alphas, e.g. "
                "last/mean_diff/last/24,26/2,3 (several layers at once: 23+24+25)"
            )
        site, method, positions, layers, alphas = parts
        if site not in SITES:
            raise ConfigError(f"grid row {row!r}: site must be one of {SITES}")
        if method not in METHODS:
            raise ConfigError(f"grid row {row!r}: method must be one of {METHODS}")
        if positions not in POSITIONS:
            raise ConfigError(f"grid row {row!r}: positions must be one of {POSITIONS}")
        try:
            layer_sets = [tuple(int(x) for x in g.split("+")) for g in layers.split(",")]
            alpha_list = [float(a) for a in alphas.split(",")]
        except ValueError as err:
            raise ConfigError(f"grid row {row!r}: layers and alphas are numbers ({err})") from None
        points += [(site, method, positions, ls, a) for ls in layer_sets for a in alpha_list]
    if not points:
        raise ConfigError("the grid is empty: pass --grid 'site/method/positions/layers/alphas'")
    return points


def layer_label(layers: tuple[int, ...]) -> str:
    return "+".join(map(str, layers))


def fit_set(lm, acts, is_pos, is_neg, method: str) -> DirectionSet:
    """One direction per layer by ``method`` (``unembed``: the answer words' unembedding
    through the final norm at every layer, scaled to the mean difference's norm)."""
    fitter = {"mean_diff": MeanDiff(), "pca": PCADiff(), "logistic": LogisticDirection(0.1)}
    ds = extract(acts, is_pos, is_neg, fitter.get(method, MeanDiff()), ("red", "green"))
    if method != "unembed":
        return ds
    axis = answer_direction(
        lm.model, word_token_ids(lm.tokenizer, "red"), word_token_ids(lm.tokenizer, "green")
    )
    axis = axis / np.linalg.norm(axis)
    vectors = {layer: axis * np.linalg.norm(v) for layer, v in ds.vectors.items()}
    return DirectionSet(vectors, ds.pos_means, ds.neg_means, "unembed", ds.contrast)


def own_side_shares(acts, is_pos, fit_fold, right, fold_sets, site, method) -> pd.DataFrame:
    """Per layer, the share of the right-answered questions whose projection on the direction
    fitted without their fold lies on their own class's side of its center: a question on the
    wrong side is pushed further into its own class by a reflection, so this share bounds the
    swap rate a reflection of that direction can reach."""
    out = []
    for layer in sorted(acts):
        own = np.zeros(len(is_pos), bool)
        for f, sets in enumerate(fold_sets):
            ds, rows = sets[site, method], fit_fold == f
            side = (acts[layer][rows] - ds.center(layer)) @ ds.vectors[layer] > 0
            own[rows] = side == is_pos[rows]
        out.append({"site": site, "method": method, "layer": layer, "own_side": own[right].mean()})
    return pd.DataFrame(out)


def edits_of(ds: DirectionSet, layers: tuple[int, ...]) -> tuple[LayerEdit, ...]:
    return tuple(LayerEdit(layer, ds.vectors[layer], ds.center(layer)) for layer in layers)


def cv_point(lm, table, fold, fold_sets, point, spans, words, mode):
    """(swapped [n], top [n]): each fold scored with the direction fitted without it."""
    site, method, positions, layers, alpha = point
    swapped = np.zeros(len(table), bool)
    top = np.empty(len(table), object)
    for f, sets in enumerate(fold_sets):
        rows = np.flatnonzero(fold == f)
        edits = edits_of(sets[site, method], layers)
        got = steered_rows(lm, table, rows, Steering(edits, mode, alpha, positions), spans, words)
        swapped[rows], top[rows] = got
    return swapped, top


def loop_rate(lm, table, steering, score: ScoreConfig, n: int) -> float:
    """Share of open-ended steered answers (n train questions, evenly spaced) that end in a
    loop: the steer stage's own prompts (model's prompt format), length and loop test."""
    score = dataclasses.replace(score, fluency=dataclasses.replace(score.fluency, n_prompts=n))
    sample = fluency_prompts(table, score, lm.tokenizer, lm.prompt_format)
    tokens = [list(map(int, t)) for t in sample["tokens"]]
    spans = None
    if steering.positions == "object":
        spans = object_spans(lm.tokenizer, tokens, sample["meta"].tolist())
    rows = GenerateScorer(score.fluency.max_tokens)(
        lm,
        tokens,
        ["green"] * len(tokens),
        ["red"] * len(tokens),
        ["green", "red"],
        steering,
        lm.pad_id,
        spans=spans,
    )
    spec = fluency_spec(score)
    return float(np.mean([fluency(r["token_ids"], spec).loop for r in rows]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/notes/color_swap_sweep.csv")
    parser.add_argument("--max-bleed", type=float, default=0.10)
    parser.add_argument(
        "--top", type=int, default=6, help="points checked for random/loops at least"
    )
    parser.add_argument(
        "--max-checks",
        type=int,
        default=20,
        help="points checked at most, in rank order, until one passes every rule",
    )
    parser.add_argument("--n-random", type=int, default=3)
    parser.add_argument("--loop-prompts", type=int, default=20, help="open-ended train answers")
    parser.add_argument("--grid-from", help="a sweep CSV whose grid rows are reused (no rescoring)")
    parser.add_argument(
        "--grid",
        help="grid rows site/method/positions/layers/alphas;... "
        "(default: the model's row of GRIDS)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        return sweep(args)
    except (MlxInterpError, OSError) as err:
        return report_error(err)


def sweep(args: argparse.Namespace) -> int:
    """Run the sweep of ``args`` (see :func:`main`); writes ``args.out``."""
    if args.grid:
        parse_grid(args.grid)  # a bad grid fails before the model loads
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mlx_interp.engine.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        composed = compose("config", overrides=["experiment=color_swap", *args.overrides])
        cfg = cast(dict[str, Any], OmegaConf.to_container(composed, resolve=True))
    start = time.perf_counter()
    root = typed(RootConfig, cfg)
    lm = load_model(root.model)
    df, _ = read_datasets(root.concept)
    prompts_cfg = prompts_config(root.prompts, root.model, lm.tokenizer)
    prompts = build_prompts(df, root.concept, prompts_cfg, lm.tokenizer, root.seed)
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
    for c in words:
        if not (right & (cond == c)).any():
            raise UntrustedResultError(
                f"the unsteered {cfg['model']['name']} answers none of the train {c} questions "
                "right, so no swap of that class can be measured: use a model that knows the "
                "colours (e.g. model=smollm2_135m) or more questions"
            )
    fold = fold_of(cond, FOLDS, int(cfg["seed"]))
    is_fit = np.isin(cond, words)
    grid = parse_grid(args.grid or default_grid(cfg["model"]["name"]))
    sets: dict = {}
    fold_sets: list[dict] = [{} for _ in range(FOLDS)]
    sides: list = []
    for site in sorted({p[0] for p in grid}):
        acts, is_pos, is_neg = site_activations(lm, fit, site, "red", "green")
        per_row = len(is_pos) // len(fit)  # 2 rows per question for the answer contrast
        fit_fold = np.repeat(fold[is_fit], per_row)
        for method in sorted({p[1] for p in grid if p[0] == site}):
            sets[site, method] = fit_set(lm, acts, is_pos, is_neg, method)
            for f in range(FOLDS):
                keep = fit_fold != f
                sub = {k: v[keep] for k, v in acts.items()}
                fold_sets[f][site, method] = fit_set(lm, sub, is_pos[keep], is_neg[keep], method)
            if per_row == 1:  # the answer contrast has two rows per question: no bound
                sides.append(
                    own_side_shares(acts, is_pos, fit_fold, right[is_fit], fold_sets, site, method)
                )
    sides_path = Path(args.out).with_name(Path(args.out).stem + "_sides.csv")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.concat(sides).to_csv(sides_path, index=False, float_format="%.4g")
    mode = make_mode("reflect")
    rows = []
    if args.grid_from:
        grid = []
        rows = pd.read_csv(args.grid_from, dtype={"layer": str})
        if "method" not in rows:  # sweeps recorded before the method axis: mean differences
            rows.insert(1, "method", "mean_diff")
        kept = [*KEYS, "swap_green", "swap_red", "bidirectional", "bleed", "seconds"]
        rows = rows[kept + [c for c in ("random", "loops") if c in rows]]  # checks reused
        rows = rows.to_dict("records")
    for point in grid:
        t = time.perf_counter()
        swapped, top = cv_point(lm, table, fold, fold_sets, point, spans, words, mode)
        got = summarize(cond, right, base_top, swapped, top, words)
        site, method, positions, layers, alpha = point
        rows.append(
            {
                "site": site,
                "method": method,
                "positions": positions,
                "layer": layer_label(layers),
                "alpha": alpha,
                **got,
                "seconds": time.perf_counter() - t,
            }
        )
        pd.DataFrame(rows).to_csv(args.out + ".partial", index=False)
        print(
            " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
            ),
            flush=True,
        )
    table_out = pd.DataFrame(rows)
    for column in ("random", "loops"):
        if column not in table_out:
            table_out[column] = np.nan
    unsteered_loops = loop_rate(lm, fit, UNSTEERED, root.score, args.loop_prompts)
    table_out["loops_unsteered"] = unsteered_loops
    print(f"unsteered loop rate {unsteered_loops:.3g}: loops must stay < 0.05 or at most that")

    def fluent(loops):  # below the goal's 5%, or no worse than the unsteered model
        return (loops < 0.05) | (loops <= unsteered_loops)

    ok = table_out[table_out["bleed"] <= args.max_bleed]
    ranked = ok.sort_values(["bidirectional", "alpha"], ascending=[False, True])
    everyone = np.arange(len(table))
    for checked, (i, point) in enumerate(ranked.iterrows()):
        # Check in rank order until the first point passing every rule (the best one that
        # does) and at least --top points, at most --max-checks; recorded checks are reused.
        if checked >= args.max_checks:
            break
        if np.isnan(point["random"]) or np.isnan(point["loops"]):
            ds = sets[point["site"], point["method"]]
            layers = tuple(int(x) for x in str(point["layer"]).split("+"))
            alpha = float(point["alpha"])
            rates = []
            for rnd in ds.random_like(args.n_random, seed=int(cfg["seed"])):
                steering = Steering(edits_of(rnd, layers), mode, alpha, point["positions"])
                swapped, top = steered_rows(lm, table, everyone, steering, spans, words)
                got = summarize(cond, right, base_top, swapped, top, words)
                rates.append((got["swap_green"] + got["swap_red"]) / 2)
            steering = Steering(edits_of(ds, layers), mode, alpha, point["positions"])
            table_out.loc[i, "random"] = float(np.mean(rates))
            table_out.loc[i, "loops"] = loop_rate(lm, fit, steering, root.score, args.loop_prompts)
            print(table_out.loc[i].to_dict(), flush=True)
        passes = table_out.loc[i, "random"] <= 0.10 and fluent(table_out.loc[i, "loops"])
        if passes and checked + 1 >= args.top:
            break
    t = table_out
    good = t[(t["bleed"] <= args.max_bleed) & (t["random"] <= 0.10) & fluent(t["loops"])]
    best = good.sort_values(["bidirectional", "alpha"], ascending=[False, True]).head(1)
    table_out["chosen"] = table_out.index.isin(best.index)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table_out.to_csv(args.out, index=False, float_format="%.4g")
    plot_sweep_frontier(
        table_out,
        Path(args.out).with_suffix(".png"),
        args.max_bleed,
        max_loops=max(0.05, unsteered_loops),
    )
    print(f"chosen: {best.to_dict('records')}; {time.perf_counter() - start:.0f} s; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
