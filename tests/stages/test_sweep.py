"""The sweep stage end to end on a tiny model with a planted answer.

The tiny random llama reads plain prompts whose last word is the object; the object's
embedding row is planted as a multiple of its class word's (tied head), so the unsteered
model answers every question right and the class lives in the last token's residual. A
reflection along the class difference must then swap most questions, a probe at layer 0
must read every side, and the stage must keep to the train split and its own rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlx_interp.analysis.sweep import Rules, expand_grid, frontier
from mlx_interp.apps.cli import run_experiment
from mlx_interp.errors import ConfigError
from mlx_interp.interventions.modes import MODES
from tests.helpers import compose_config
from tests.stages.planted import plant, planted_dataset, planted_overrides

GRID = (
    "[{site: resid, layers: [1, 2], alphas: [1.0]},"
    " {site: resid, mode: add, gate: {measured: last, layer: 0}, layers: [2], alphas: [3.0]},"
    " {site: attn_out, layers: [2], alphas: [1.0]},"
    " {site: heads, heads: 2, layers: [2], alphas: [1.0]}]"
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    overrides = [
        *planted_overrides(root, planted_dataset(root / "d.jsonl")),
        "pipeline.stages=[sweep_report]",
        f"sweep.grid={GRID}",
        "sweep.n_random=1",
        "sweep.loop_prompts=2",
        "sweep.top=2",
        "sweep.max_checks=3",
    ]
    cfg = compose_config(overrides)
    plant(cfg)
    results = run_experiment(cfg, root / "run")
    art = Path(results["sweep"]["path"])
    info = json.loads((art / "sweep.json").read_text())
    return root, pd.read_parquet(art / "sweep.parquet"), info


def test_every_point_is_scored_on_train_only(swept):
    _, table, info = swept
    assert info["n_questions"] == {"green": 12, "red": 12} and info["n_controls"] == 6
    assert info["n_right"] == {"green": 12, "red": 12}  # the planted answer, unsteered
    assert table[["site", "layer"]].values.tolist() == [
        ["resid", "1"],
        ["resid", "2"],
        ["resid", "2"],
        ["attn_out", "2"],
        ["heads", "2"],
    ]
    rates = table[["swap_green", "swap_red", "bidirectional", "bleed"]].to_numpy()
    assert np.nanmin(rates) >= 0 and np.nanmax(rates) <= 1
    assert (table["bidirectional"] == table[["swap_green", "swap_red"]].min(axis=1)).all()


def test_the_planted_class_is_swapped_both_ways(swept):
    _, table, _ = swept
    reflect = table[(table["site"] == "resid") & (table["gate"] == "")]
    assert reflect["bidirectional"].max() >= 0.8
    gated = table[table["gate"] != ""].iloc[0]
    assert gated["gate"] == "last@0" and gated["bound"] == 1.0  # the probe reads every side
    assert gated["bidirectional"] >= 0.8


def test_checks_follow_the_rules(swept):
    _, table, info = swept
    checked = table["random"].notna()
    assert checked.sum() >= 2 and (checked == table["loops"].notna()).all()
    assert not checked[table["bleed"] > 0.10].any()
    assert table["chosen"].sum() <= 1
    rules = Rules()
    if table["chosen"].any():
        best = table[table["chosen"]].iloc[0]
        assert rules.passing(table.loc[[best.name]], info["loops_unsteered"]).all()
        passing = table[rules.passing(table, info["loops_unsteered"])]
        assert best["bidirectional"] == passing["bidirectional"].max()


def test_report_gives_the_frontier_of_each_intervention(swept):
    root, table, info = swept
    text = (root / "run" / "sweep.md").read_text()
    assert "## Frontier and ceiling of each intervention" in text
    assert (root / "run" / "frontier.png").is_file()
    front = frontier(table, Rules(), info["loops_unsteered"])
    assert len(front) == table["family"].nunique() == 4
    for family in table["family"].unique():
        assert family in text


@pytest.mark.parametrize(
    "row, match",
    [
        ({"site": "nowhere", "layers": [1], "alphas": [1]}, "site must be one of"),
        ({"method": "nope", "layers": [1], "alphas": [1]}, "method must be one of"),
        ({"layers": [], "alphas": [1]}, "at least one layer"),
        ({"layers": [1], "alphas": []}, "alphas"),
        ({"site": "heads", "method": "unembed", "layers": [1], "alphas": [1]}, "unembed"),
        ({"heads": 2, "layers": [1], "alphas": [1]}, "heads is for site heads"),
        ({"gate": {"measured": "x", "layer": 1}, "layers": [1], "alphas": [1]}, "gate.measured"),
        ({"gate": {"measured": "last", "layer": 2}, "layers": [2], "alphas": [1]}, "below"),
        (
            {"gate": {"layer": 2}, "positions": "object", "layers": [3], "alphas": [1]},
            "unedited",
        ),
    ],
)
def test_bad_grid_rows_are_named(row, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid([row], tuple(MODES))


def test_grid_rows_expand_to_points():
    points = expand_grid(
        [{"site": "resid", "layers": [2, [3, 4]], "alphas": [1, 2.5], "gate": {"layer": 1}}],
        tuple(MODES),
    )
    assert [(p.layers, p.alpha) for p in points] == [
        ((2,), 1.0),
        ((2,), 2.5),
        ((3, 4), 1.0),
        ((3, 4), 2.5),
    ]
    assert points[2].layer_label == "3+4" and points[0].gate.label == "object@1"


def test_a_gated_point_takes_the_bound_of_its_own_gate_method():
    """Two gates at the same role and layer but by different methods have different
    accuracies: each point's bound is its own gate's (the first found was taken for both)."""
    from mlx_interp.stages.sweep import point_bound

    bounds = [
        {"kind": "gate", "measured": "last", "layer": 1, "method": m, "share": s}
        for m, s in (("lens", 0.5), ("unembed", 0.75))
    ]
    rows = [
        {
            "site": "resid",
            "layers": [2],
            "alphas": [1],
            "gate": {"layer": 1, "measured": "last", "method": m},
        }
        for m in ("unembed", "lens")
    ]
    unembed, lens = expand_grid(rows, tuple(MODES))
    assert point_bound(bounds, unembed) == 0.75
    assert point_bound(bounds, lens) == 0.5
