"""Stage `sweep`: which steering setting, chosen on the fitting split only (reads model,
score, sweep, seed; needs prompts).

Every point of ``sweep.grid`` (:mod:`mlx_interp.analysis.sweep`: site kind, where the
direction is read, method, mode, positions, layers, alpha, heads, gate) is scored by
cross-validation inside ``sweep.split`` (``sweep.folds`` folds, stratified): each prompt is
steered with a direction (and gate probe) fitted on the other folds, so a point is ranked by
how it carries to questions it has not seen. Per point: the swap rate of each class among the
questions the unsteered model answers right, the bidirectional rate (the lower), the bleed
(controls whose top token becomes a swap word) and the bound (reflect: the share of unseen
questions on their own side of the direction; gated: the probe's cross-validated accuracy).
The best points within the bleed bound are then checked for random directions of equal norm
and for loops of open-ended answers, in rank order, until one passes every rule; it is
``chosen``. Other splits are never read.

Writes sweep.parquet (a row per point), bounds.parquet (own-side shares per layer and gate
accuracies), sweep.json (counts, the unsteered loop rate, the rules, the chosen point).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlx_interp.analysis.directions import DirectionSet, extract, make_method
from mlx_interp.analysis.settings import edits_for, head_effects, keep_heads, top_heads
from mlx_interp.analysis.sides import side_labels
from mlx_interp.analysis.sweep import SITE_KIND, Rules, choose, expand_grid, fold_of, ranked
from mlx_interp.analysis.sweep import summarize as summarize_point
from mlx_interp.engine.dag import Stage
from mlx_interp.engine.schema import ModelConfig, ScoreConfig, SweepConfig
from mlx_interp.errors import ConfigError, UntrustedResultError
from mlx_interp.interventions.modes import MODES, make_mode
from mlx_interp.interventions.sites import head_shape
from mlx_interp.models.loading import load_model, model_fingerprint
from mlx_interp.stages.direction_sites import (
    answer_axis_set,
    read_at,
    role_spans,
    side_reader,
    site_activations,
)
from mlx_interp.stages.sweep_scoring import (
    loop_rate,
    sided_scores,
    spans_of,
    steering_maker,
    unsteered_rows,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepInputs:
    model: ModelConfig
    score: ScoreConfig  # the swap words, the controls, the loop test
    sweep: SweepConfig
    seed: int


def fingerprint(inputs: SweepInputs) -> dict:
    return {"model": model_fingerprint(inputs.model)}


LOGISTIC = {"_target_": "mlx_interp.analysis.directions.LogisticDirection", "C": 0.1}


def _fitter(method: str):
    return make_method(LOGISTIC if method == "logistic" else method)


def fit_set(lm, acts, is_pos, is_neg, method: str, contrast) -> DirectionSet:
    """One direction per layer by ``method``; ``unembed``: the answer words' unembedding
    through the final norm (the same axis at every layer), scaled to the mean difference."""
    ds = extract(
        acts, is_pos, is_neg, _fitter(method if method != "unembed" else "mean_diff"), contrast
    )
    return answer_axis_set(lm, ds) if method == "unembed" else ds


class Fits:
    """Direction sets per (site, measured, method), fitted on every fold's complement and on
    the whole split, and the own-side share of each (the bound of a reflection)."""

    def __init__(self, lm, fit: pd.DataFrame, fold, right, contrast, points=()):
        self.lm, self.fit, self.fold, self.right, self.contrast = lm, fit, fold, right, contrast
        self.layers_of: dict[str, set[int]] = {}  # site kind -> every layer a point edits
        for p in points:
            self.layers_of.setdefault(p.site, set()).update(p.layers)
        self.folds = int(fold.max()) + 1
        self.sets: dict[tuple, list[DirectionSet]] = {}  # key -> [fold 0..k-1, whole]
        self.acts: dict[tuple, tuple] = {}  # (site, measured) -> activations, is_pos, is_neg
        self.bounds: list[dict] = []

    def get(self, site, measured, method, layers) -> list[DirectionSet]:
        key = (site, measured, method)
        if key not in self.sets:
            acts, is_pos, is_neg = self.read(site, measured, layers)
            per_row = len(is_pos) // len(self.fit)  # 2 rows per question: the answer contrast
            fit_fold = np.repeat(self.fold, per_row)
            sets = []
            for f in range(self.folds):
                keep = fit_fold != f
                sub = {k: v[keep] for k, v in acts.items()}
                sets.append(
                    fit_set(self.lm, sub, is_pos[keep], is_neg[keep], method, self.contrast)
                )
            sets.append(fit_set(self.lm, acts, is_pos, is_neg, method, self.contrast))
            self.sets[key] = sets
            if per_row == 1:
                self._own_side(key, acts, is_pos, sets)
        sets = self.sets[key]
        missing = [layer for layer in layers if layer not in sets[-1].vectors]
        if missing:
            raise ConfigError(
                f"sweep: site {site} was read at layers {sets[-1].layers}, not {missing}"
            )
        return sets

    def read(self, site, measured, layers) -> tuple:
        """The fitting rows' activations at a site kind and token role (read once; every
        layer of the residual, the listed layers of other sites)."""
        if (site, measured) not in self.acts:
            kind = SITE_KIND[site]
            wanted = None if kind == "resid" else sorted(self.layers_of.get(site, layers))
            pos, neg = self.contrast
            self.acts[site, measured] = site_activations(
                self.lm, self.fit, measured, pos, neg, wanted, kind
            )
        return self.acts[site, measured]

    def _own_side(self, key, acts, is_pos, sets) -> None:
        for layer in sorted(acts):
            own = np.zeros(len(is_pos), bool)
            for f in range(self.folds):
                rows, ds = self.fold == f, sets[f]
                side = (acts[layer][rows] - ds.center(layer)) @ ds.vectors[layer] > 0
                own[rows] = side == is_pos[rows]
            site, measured, method = key
            share = float(own[self.right].mean())
            self.bounds.append(
                {
                    "kind": "own_side",
                    "site": site,
                    "measured": measured,
                    "method": method,
                    "layer": layer,
                    "share": share,
                }
            )


def gate_sides(lm, table, fold, gate, contrast, right, bounds) -> np.ndarray:
    """Cross-validated side per table row: the probe of each fold fitted on the others."""
    acts = read_at(
        lm,
        [list(map(int, t)) for t in table["tokens"]],
        role_spans(lm, table, gate.measured),
        [gate.layer],
    )[gate.layer]
    labels = side_labels(table["condition"].to_numpy(), *contrast)
    sides = np.empty(len(table), object)
    for f in range(int(fold.max()) + 1):
        rows = fold == f
        probe = side_reader(lm, gate.method, gate.C, contrast).fit(acts[~rows], labels[~rows])
        sides[rows] = probe.predict(acts[rows])
    swap_rows = labels != "other"
    accuracy = float((sides == labels)[swap_rows & right].mean())
    bounds.append(
        {
            "kind": "gate",
            "site": "resid",
            "measured": gate.measured,
            "method": gate.method,
            "layer": gate.layer,
            "share": accuracy,
            "share_all": float((sides == labels)[swap_rows].mean()),
        }
    )
    return sides


def run(inputs: SweepInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the sweep on the split ``sweep.split``; needs prompts."""
    score, sweep, seed = inputs.score, inputs.sweep, inputs.seed
    points = expand_grid([dataclasses.asdict(row) for row in sweep.grid], tuple(MODES))
    rules = Rules(sweep.max_bleed, sweep.max_random, sweep.max_loops)
    contrast = (str(sweep.contrast["pos"]), str(sweep.contrast["neg"]))
    swap = dict(score.swap)
    if set(contrast) != set(swap):
        raise ConfigError(f"sweep.contrast {contrast} must be the two swap conditions {list(swap)}")
    lm = load_model(inputs.model)
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    prompts = prompts[prompts["split"] == sweep.split]
    table = prompts[prompts["condition"].isin([*swap, *score.controls])].reset_index(drop=True)
    cond = table["condition"].to_numpy()
    base = unsteered_rows(lm, table, swap)
    # right: the unsteered model prefers its own word (the target's margin is negative)
    right = ~base[0] & np.isin(cond, list(swap))
    for c in swap:
        if not (right & (cond == c)).any():
            raise UntrustedResultError(
                f"the unsteered {inputs.model.name} answers none of the {sweep.split} {c} "
                "questions right, so no swap of that class can be measured: use a model that "
                "knows them, or more questions"
            )
    fold = fold_of(cond, sweep.folds, seed)
    is_fit = np.isin(cond, list(swap))
    fits = Fits(
        lm, table[is_fit].reset_index(drop=True), fold[is_fit], right[is_fit], contrast, points
    )
    spans = spans_of(lm, table) if any(p.positions == "object" for p in points) else None
    gates = {}
    for gate in sorted({p.gate for p in points if p.gate}, key=lambda g: g.label):
        gates[gate] = gate_sides(lm, table, fold, gate, contrast, right, fits.bounds)
    on = Scoring(lm, table, fold, fits, gates, spans, swap, base, right)
    progress = out / "progress"
    progress.mkdir(exist_ok=True)
    rows = []
    for i, point in enumerate(points):
        done = progress / f"{i:04d}.json"
        if done.is_file():  # an interrupted run's finished points are reused
            rows.append(json.loads(done.read_text()))
            continue
        started = time.perf_counter()
        swapped, top = cv_point(on, point)
        row = {**point.row(), **summarize_point(cond, right, base[1], swapped, top, list(swap))}
        row["bound"] = point_bound(fits.bounds, point)
        row["seconds"] = time.perf_counter() - started
        done.write_text(json.dumps(row))
        rows.append(row)
        log.info("sweep %d/%d %s", i + 1, len(points), row)
    table_out = pd.DataFrame(rows).assign(random=np.nan, loops=np.nan)
    unsteered = loop_rate(lm, table[is_fit], sweep.loop_prompts, score, None, None, None)
    check(on, points, table_out, rules, sweep, seed, score, unsteered)
    table_out["chosen"] = choose(table_out, rules, unsteered)
    table_out.to_parquet(out / "sweep.parquet", index=False)
    pd.DataFrame(fits.bounds).to_parquet(out / "bounds.parquet", index=False)
    chosen = table_out[table_out["chosen"]].to_dict("records")
    summary = {
        "model": inputs.model.name,
        "split": str(sweep.split),
        "n_questions": {c: int((cond == c).sum()) for c in swap},
        "n_right": {c: int((right & (cond == c)).sum()) for c in swap},
        "n_controls": int((~is_fit).sum()),
        "folds": sweep.folds,
        "loops_unsteered": unsteered,
        "rules": {
            "max_bleed": rules.max_bleed,
            "max_random": rules.max_random,
            "max_loops": rules.max_loops,
        },
        "points": len(points),
        "chosen": chosen[0] if chosen else None,
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=float))
    for f in progress.iterdir():
        f.unlink()
    progress.rmdir()
    return {"points": len(points), "chosen": summary["chosen"]}


def point_bound(bounds: list[dict], point) -> float:
    """The bound of a point: its gate's accuracy (the gate read at the same role, layer
    and by the same method), or (reflect) the own-side share of its direction at its last
    layer."""
    for b in bounds:
        if (
            point.gate
            and b["kind"] == "gate"
            and (b["measured"], b["layer"], b["method"])
            == (point.gate.measured, point.gate.layer, point.gate.method)
        ):
            return b["share"]
        if (
            not point.gate
            and point.mode.startswith("reflect")
            and b["kind"] == "own_side"
            and (b["site"], b["measured"], b["method"], b["layer"])
            == (point.site, point.measured, point.method, point.layers[-1])
        ):
            return b["share"]
    return float("nan")


def point_sets(lm, fits, point) -> list[DirectionSet]:
    """The point's direction sets (per fold and whole), restricted to its heads."""
    sets = fits.get(point.site, point.measured, point.method, point.layers)
    if point.site != "heads" or point.heads is None:
        return sets
    out = []
    for ds in sets:
        layer = point.layers[-1]
        n_heads = head_shape(lm.model, layer)[0]
        heads = point.heads
        if isinstance(heads, int):
            heads = top_heads(head_effects(lm.model, layer, ds.vectors[layer]), heads)
        out.append(keep_heads(ds, heads, n_heads))
    return out


@dataclass(frozen=True)
class Scoring:
    """What every point of one sweep is scored on (built once by :func:`run`): the model,
    the split's table with its folds, fits, gate sides, object spans, swap words, unsteered
    results ``base`` and which rows the unsteered model answers ``right``."""

    lm: Any
    table: pd.DataFrame
    fold: np.ndarray
    fits: Fits
    gates: dict
    spans: Any
    swap: dict
    base: tuple
    right: np.ndarray

    @property
    def cond(self) -> np.ndarray:
        return self.table["condition"].to_numpy()

    @property
    def is_fit(self) -> np.ndarray:
        return np.isin(self.cond, list(self.swap))

    def steering(self, point) -> tuple[str, Any, Any]:
        """(site kind, setting maker, gate sides or None) of ``point``."""
        make = steering_maker(make_mode(point.mode), point.alpha, point.positions)
        return SITE_KIND[point.site], make, self.gates.get(point.gate) if point.gate else None

    def scores(self, groups, make, sides):
        """(swapped [n], top [n]) of the table under ``groups`` (see :func:`sided_scores`)."""
        return sided_scores(
            self.lm, self.table, groups, make, sides, self.spans, self.swap, self.base
        )


def cv_point(on: Scoring, point):
    """(swapped [n], top [n]) of the table: each fold steered with its own fit (and each
    row, for a gated point, by its side's edit), all in one batch of settings."""
    kind, make, sides = on.steering(point)
    sets = point_sets(on.lm, on.fits, point)
    groups = [
        (np.flatnonzero(on.fold == f), partial(edits_for, sets[f], point.layers, kind))
        for f in range(on.fits.folds)
    ]
    return on.scores(groups, make, sides)


def check(on: Scoring, points, table_out, rules, sweep, seed, score, unsteered) -> None:
    """Random directions and loops of the best points within the bleed bound, in rank order,
    until the first passing every rule (and at least ``sweep.top`` points)."""
    lm, table, swap, right = on.lm, on.table, on.swap, on.right
    cond, is_fit, base = on.cond, on.is_fit, on.base
    for checked, i in enumerate(ranked(table_out, rules).index):
        if checked >= sweep.max_checks:
            break
        point = points[int(i)]
        kind, make, sides = on.steering(point)
        ds = point_sets(lm, on.fits, point)[-1]
        everyone = np.arange(len(table))
        rates = []
        for rnd in ds.random_like(sweep.n_random, seed=seed):
            if point.site == "heads" and "heads" in ds.meta:
                rnd = keep_heads(rnd, ds.meta["heads"], head_shape(lm.model, point.layers[-1])[0])
            edits = partial(edits_for, rnd, point.layers, kind)
            swapped, top = on.scores([(everyone, edits)], make, sides)
            s = summarize_point(cond, right, base[1], swapped, top, list(swap))
            rates.append(np.mean([s[f"swap_{c}"] for c in swap]))
        table_out.loc[i, "random"] = float(np.mean(rates)) if rates else float("nan")
        edits = partial(edits_for, ds, point.layers, kind)
        fit_sides = None if sides is None else sides[is_fit]
        table_out.loc[i, "loops"] = loop_rate(
            lm, table[is_fit], sweep.loop_prompts, score, edits, fit_sides, make
        )
        log.info("sweep check %s", table_out.loc[i].to_dict())
        passes = rules.passing(table_out.loc[[i]], unsteered).iloc[0]
        if passes and checked + 1 >= sweep.top:
            break


STAGE = Stage(
    name="sweep",
    run=run,
    inputs=SweepInputs,
    needs=("prompts",),
    fingerprint=fingerprint,
    resumable=True,  # points of a killed run are kept (progress/) and reused
    writes=("sweep.parquet", "bounds.parquet", "sweep.json"),
)
