"""A steering sweep's grid, folds, summary and selection rule (pure: no model here).

A grid row (``sweep.grid`` in config) expands to points: where the edit acts (``site``: the
residual after a layer, the attention output, some heads' outputs, the values), where the
direction is read (``measured``: a token role), how it is fitted (``method``), the mode,
the positions edited, the layer or layers edited at once, alpha, and optionally a ``gate``: a
probe that reads each prompt's class so that the edit moves it toward the other class
(:mod:`mlx_interp.analysis.sides`). The sweep scores every point by cross-validation inside
the fitting split, then checks the best ones for random directions and loops in rank order;
:func:`choose` applies the rule, :func:`frontier` says what each intervention reaches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlx_interp.errors import ConfigError

SITES = ("resid", "attn_out", "heads", "values")  # the site kinds a sweep edits
SITE_KIND = {"resid": "resid", "attn_out": "attn", "heads": "heads", "values": "v"}
ROLES = ("last", "object", "answer")  # token roles a direction or gate is read at
METHODS = ("mean_diff", "pca", "logistic", "unembed")
KEYS = ["site", "measured", "method", "mode", "positions", "layer", "alpha", "heads", "gate"]


GATE_METHODS = ("probe", "unembed", "lens")  # a logistic probe, the answer words' axis, or
# that axis with "other" read from the logit lens (mlx_interp.stages.direction_sites)


@dataclass(frozen=True)
class Gate:
    """A side read at the residual after ``layer`` at token role ``measured``: by a fitted
    probe (``probe``) or along the answer words' unembedding (``unembed``)."""

    measured: str
    layer: int
    C: float = 1.0
    method: str = "probe"

    @property
    def label(self) -> str:
        suffix = "" if self.method == "probe" else f" ({self.method})"
        return f"{self.measured}@{self.layer}{suffix}"


@dataclass(frozen=True)
class SweepPoint:
    """One steering setting of a sweep."""

    site: str
    measured: str
    method: str
    mode: str
    positions: str
    layers: tuple[int, ...]
    alpha: float
    heads: int | tuple[int, ...] | None = None
    gate: Gate | None = None

    @property
    def layer_label(self) -> str:
        return "+".join(map(str, self.layers))

    @property
    def heads_label(self) -> str:
        if self.heads is None:
            return ""
        if isinstance(self.heads, int):
            return f"top{self.heads}"
        return "+".join(map(str, self.heads))

    @property
    def family(self) -> str:
        """The intervention a point belongs to (its frontier and ceiling are reported)."""
        gate = f", gated at {self.gate.label}" if self.gate else ""
        return f"{self.site} ({self.measured}, {self.method}, {self.mode}{gate})"

    def row(self) -> dict:
        return {
            "site": self.site,
            "measured": self.measured,
            "method": self.method,
            "mode": self.mode,
            "positions": self.positions,
            "layer": self.layer_label,
            "alpha": float(self.alpha),
            "heads": self.heads_label,
            "gate": self.gate.label if self.gate else "",
            "family": self.family,
        }


def _layer_sets(raw: Any, where: str) -> list[tuple[int, ...]]:
    sets = []
    for item in raw or []:
        group = item if isinstance(item, (list, tuple)) else [item]
        if not group or not all(isinstance(x, int) and not isinstance(x, bool) for x in group):
            raise ConfigError(f"{where}: layers are ints or lists of ints edited at once")
        sets.append(tuple(group))
    if not sets:
        raise ConfigError(f"{where}: give at least one layer, e.g. layers: [23, 24]")
    return sets


def _gate(raw: Any, where: str) -> Gate | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or "layer" not in raw:
        raise ConfigError(
            f"{where}: gate is null or {{measured: object, layer: 12, C: 1.0, method: probe}}"
        )
    measured = str(raw.get("measured", "object"))
    if measured not in ("last", "object"):
        raise ConfigError(f"{where}: gate.measured must be last or object, not {measured!r}")
    method = str(raw.get("method", "probe"))
    if method not in GATE_METHODS:
        raise ConfigError(f"{where}: gate.method must be one of {GATE_METHODS}, not {method!r}")
    return Gate(measured, int(raw["layer"]), float(raw.get("C", 1.0)), method)


def check_gate_precedes(gate: Gate | None, site: str, layers, positions: str, where: str):
    """A gate must read what the forward computes before the first edit, so that one forward
    could both read it and steer: the object's tokens when they are not edited, or the last
    token's residual after a layer below the first edited one (an edit at a site inside
    layer L comes after the residual of layer L - 1)."""
    if gate is None:
        return
    if gate.measured == "object" and positions in ("object", "all"):
        raise ConfigError(f"{where}: a gate at the object's tokens needs them unedited")
    if gate.measured == "last" and gate.layer >= min(layers):
        raise ConfigError(
            f"{where}: a gate at the last token must read a layer below the first edited one "
            f"({min(layers)}), not {gate.layer}: it would read its own edit"
        )


def expand_grid(rows: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> list[SweepPoint]:
    """The points of ``sweep.grid`` rows; a bad row is a :class:`ConfigError` naming it."""
    points = []
    for i, row in enumerate(rows):
        where = f"sweep.grid[{i}]"
        site, measured = str(row.get("site", "resid")), str(row.get("measured", "last"))
        method, mode = str(row.get("method", "mean_diff")), str(row.get("mode", "reflect"))
        for name, value, allowed in (
            ("site", site, SITES),
            ("measured", measured, ROLES),
            ("method", method, METHODS),
            ("mode", mode, tuple(modes)),
        ):
            if value not in allowed:
                raise ConfigError(f"{where}: {name} must be one of {allowed}, not {value!r}")
        if method == "unembed" and site not in ("resid", "attn_out"):
            raise ConfigError(f"{where}: method unembed needs a site of width d_model")
        if measured == "answer" and site != "resid":
            raise ConfigError(f"{where}: the answer contrast is read at the residual only")
        heads = row.get("heads")
        if heads is not None and site != "heads":
            raise ConfigError(f"{where}: heads is for site heads only")
        if isinstance(heads, (list, tuple)):
            heads = tuple(int(h) for h in heads)
        elif heads is not None:
            heads = int(heads)
        alphas = [float(a) for a in row.get("alphas") or []]
        if not alphas or not all(np.isfinite(alphas)):
            raise ConfigError(f"{where}: alphas must be a non-empty list of numbers")
        gate = _gate(row.get("gate"), where)
        for layers in _layer_sets(row.get("layers"), where):
            check_gate_precedes(gate, site, layers, str(row.get("positions", "last")), where)
            for alpha in alphas:
                points.append(
                    SweepPoint(
                        site,
                        measured,
                        method,
                        mode,
                        str(row.get("positions", "last")),
                        layers,
                        alpha,
                        heads,
                        gate,
                    )
                )
    if not points:
        raise ConfigError("sweep.grid is empty: give rows in conf/model_concept/<model>_<concept>")
    return points


def fold_of(conditions: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row, stratified by condition (seeded)."""
    rng = np.random.default_rng(seed)
    conditions = np.asarray(conditions)
    out = np.zeros(len(conditions), int)
    for c in sorted(set(conditions.tolist())):
        idx = np.flatnonzero(conditions == c)
        out[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return out


def summarize(cond, right, base_top, swapped, top, classes: Sequence[str]) -> dict:
    """Per-class swap rates among the questions answered right unsteered (``swap_<class>``),
    the bidirectional rate (the lower), and the bleed: the share of the other rows (controls)
    whose top token became one of the classes' words."""
    out = {}
    for c in classes:
        ok = right & (cond == c)
        out[f"swap_{c}"] = float(swapped[ok].mean()) if ok.any() else float("nan")
    out["bidirectional"] = min(out[f"swap_{c}"] for c in classes)
    ctrl = ~np.isin(cond, classes)
    became = np.isin(top, classes) & ~np.isin(base_top, classes)
    out["bleed"] = float(became[ctrl].mean()) if ctrl.any() else float("nan")
    return out


@dataclass(frozen=True)
class Rules:
    """The selection rule: bleed, random and loop bounds (loops: below ``max_loops`` or no
    more than the unsteered model's rate on the same answers)."""

    max_bleed: float = 0.10
    max_random: float = 0.10
    max_loops: float = 0.05

    def fluent(self, loops: Any, unsteered: float) -> Any:
        return (loops < self.max_loops) | (loops <= unsteered)

    def passing(self, table: pd.DataFrame, unsteered: float) -> pd.Series:
        """Rows passing every rule (rows not checked for random and loops fail)."""
        return (
            (table["bleed"] <= self.max_bleed)
            & (table["random"] <= self.max_random)
            & self.fluent(table["loops"], unsteered)
        )


def ranked(table: pd.DataFrame, rules: Rules) -> pd.DataFrame:
    """Rows within the bleed bound, best bidirectional first (ties: smaller alpha)."""
    ok = table[table["bleed"] <= rules.max_bleed]
    return ok.sort_values(["bidirectional", "alpha"], ascending=[False, True], kind="stable")


def choose(table: pd.DataFrame, rules: Rules, unsteered: float) -> pd.Series:
    """bool per row: the chosen point (the best passing every rule), at most one True."""
    good = table[rules.passing(table, unsteered)]
    best = good.sort_values(["bidirectional", "alpha"], ascending=[False, True], kind="stable")
    return pd.Series(table.index.isin(best.index[:1]), index=table.index)


def frontier(table: pd.DataFrame, rules: Rules, unsteered: float) -> pd.DataFrame:
    """Per intervention (``family``): its ceiling (the best bidirectional rate at any bleed),
    the best within the bleed bound, the best passing every rule, and the bound when one was
    measured (``bound``: the own-side share or the probe's accuracy)."""
    rows = []
    passing = rules.passing(table, unsteered)
    for family, group in table.groupby("family", sort=False):
        best = group.sort_values("bidirectional", ascending=False, kind="stable")
        within = best[best["bleed"] <= rules.max_bleed]
        ok = best[passing[best.index]]
        rows.append(
            {
                "family": family,
                "points": len(group),
                "ceiling": float(best["bidirectional"].iloc[0]),
                "ceiling_at": _at(best.iloc[0]),
                "ceiling_bleed": float(best["bleed"].iloc[0]),
                "within_bleed": float(within["bidirectional"].iloc[0]) if len(within) else np.nan,
                "within_bleed_at": _at(within.iloc[0]) if len(within) else "",
                "passing": float(ok["bidirectional"].iloc[0]) if len(ok) else np.nan,
                "passing_at": _at(ok.iloc[0]) if len(ok) else "",
                "bound": float(group["bound"].max()) if "bound" in group else np.nan,
            }
        )
    return pd.DataFrame(rows).sort_values("ceiling", ascending=False, kind="stable")


def _at(row: pd.Series) -> str:
    heads = f" heads {row['heads']}" if row.get("heads") else ""
    return f"layer {row['layer']}{heads}, alpha {row['alpha']:g}"
