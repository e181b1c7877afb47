"""The train-only steering sweep (mlx_interp.apps.steer_sweep) on the tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlx_interp.apps import steer_sweep
from mlx_interp.errors import ConfigError


def test_parse_grid_expands_rows_and_multi_layer_points():
    points = steer_sweep.parse_grid("last/mean_diff/last/2,3+4/1,2.5; object/pca/object/1/3")
    assert points == [
        ("last", "mean_diff", "last", (2,), 1.0),
        ("last", "mean_diff", "last", (2,), 2.5),
        ("last", "mean_diff", "last", (3, 4), 1.0),
        ("last", "mean_diff", "last", (3, 4), 2.5),
        ("object", "pca", "object", (1,), 3.0),
    ]
    assert steer_sweep.layer_label((3, 4)) == "3+4"


@pytest.mark.parametrize(
    "grid, match",
    [
        ("last/mean_diff/last/2", "site/method/positions/layers/alphas"),
        ("last/nope/last/2/1", "method must be one of"),
        ("last/mean_diff/everywhere/2/1", "positions must be one of"),
        ("last/mean_diff/last/two/1", "numbers"),
        ("nowhere/mean_diff/last/2/1", "site must be one of"),
        (" ; ", "empty"),
    ],
)
def test_parse_grid_refuses_with_the_fix(grid, match):
    with pytest.raises(ConfigError, match=match):
        steer_sweep.parse_grid(grid)


def test_every_recorded_grid_parses():
    for name, grid in steer_sweep.GRIDS.items():
        assert steer_sweep.parse_grid(grid), name
    with pytest.raises(ConfigError, match="--grid"):
        steer_sweep.default_grid("tiny_random")


def test_folds_are_stratified_and_seeded():
    cond = np.array(["green"] * 7 + ["red"] * 5 + ["control"] * 4)
    fold = steer_sweep.fold_of(cond, 3, seed=1)
    for c in ("green", "red", "control"):
        counts = np.bincount(fold[cond == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert (fold == steer_sweep.fold_of(cond, 3, seed=1)).all()
    assert (fold != steer_sweep.fold_of(cond, 3, seed=2)).any()


def test_a_class_the_model_never_answers_right_is_refused(tmp_path, capsys):
    """The tiny random model answers every question alike: one class has no question to swap,
    so its rate would be 0/0; the sweep stops with one line instead of ranking NaNs."""
    out = tmp_path / "sweep.csv"
    rc = steer_sweep.main(
        ["--out", str(out), "--grid", "last/mean_diff/last/1/2", "model=tiny_random"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "answers none of the train" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_sweep_runs_end_to_end_on_smollm2(tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    grid = "last/mean_diff/last/24,23+24+25/3;last/unembed/last/26/3;object/pca/object/2/2"
    argv = ["--out", str(out), "--grid", grid, "--top", "2", "--n-random", "1"]
    rc = steer_sweep.main([*argv, "--loop-prompts", "2"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out, dtype={"layer": str})
    assert table[["site", "method", "layer"]].values.tolist() == [
        ["last", "mean_diff", "24"],
        ["last", "mean_diff", "23+24+25"],
        ["last", "unembed", "26"],
        ["object", "pca", "2"],
    ]
    rates = table[["swap_green", "swap_red", "bidirectional", "bleed"]].to_numpy()
    assert np.nanmin(rates) >= 0 and np.nanmax(rates) <= 1
    assert (table["bidirectional"] == table[["swap_green", "swap_red"]].min(axis=1)).all()
    sides = pd.read_csv(tmp_path / "sweep_sides.csv")  # the bound on a reflection's swap rate
    assert set(sides["method"]) == {"mean_diff", "unembed", "pca"}  # not the answer site
    assert sides["own_side"].between(0, 1).all() and len(sides) == 3 * 30
    assert table["loops_unsteered"].between(0, 1).all() and table["loops_unsteered"].nunique() == 1
    checked = table["random"].notna()
    assert checked.sum() >= 2 and (checked == table["loops"].notna()).all()
    assert not checked[table["bleed"] > 0.10].any()  # only points within the bleed bound
    assert table["chosen"].sum() <= 1
    if table["chosen"].any():  # the best checked point passing every rule
        best = table[table["chosen"]].iloc[0]
        unsteered = table["loops_unsteered"].iloc[0]  # no more loops than unsteered, or < 5%
        fluent = (table["loops"] < 0.05) | (table["loops"] <= unsteered)
        assert best["random"] <= 0.10 and fluent[best.name] and best["bleed"] <= 0.10
        passing = table[checked & (table["random"] <= 0.10) & fluent]
        assert best["bidirectional"] == passing["bidirectional"].max()
    # the recorded rows are reused without rescoring
    again = tmp_path / "again.csv"
    rc = steer_sweep.main(
        [
            "--out",
            str(again),
            "--grid-from",
            str(out),
            "--top",
            "1",
            "--n-random",
            "1",
            "--loop-prompts",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    reused = pd.read_csv(again, dtype={"layer": str})
    assert reused["bidirectional"].tolist() == pytest.approx(table["bidirectional"].tolist())
    recorded = table["random"].notna()  # recorded checks are reused, not redrawn
    assert reused["random"][recorded].tolist() == pytest.approx(table["random"][recorded].tolist())


def test_bad_grid_is_one_line_and_exit_2(tmp_path, capsys):
    rc = steer_sweep.main(["--out", str(tmp_path / "x.csv"), "--grid", "last/x/last/1/2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "x.csv").exists()
