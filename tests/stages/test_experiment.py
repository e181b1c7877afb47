"""The colour-swap DAG on the tiny random model: every stage runs, sweeps reuse upstream work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mlx_interp.apps.cli import run_experiment
from tests.helpers import compose_config, write_dataset

ROOT = Path(__file__).resolve().parents[2]


def _overrides(tmp_path: Path, dataset: Path, *extra: str) -> list[str]:
    """Base overrides for the tiny DAG; a key in ``extra`` replaces the base value (a key may
    be given only once on the command line)."""
    given = {e.split("=", 1)[0] for e in extra}
    base = [
        "model=tiny_random",
        f"concept.dataset={dataset}",
        "concept.fewshot=[]",
        f"paths.outputs={tmp_path / 'outputs'}",
        "steer.layer=2",
        "steer.n_random=3",
        "steer.confirm_n=4",
    ]
    return [o for o in base if o.split("=", 1)[0] not in given] + list(extra)


def _dataset(tmp_path: Path) -> Path:
    return write_dataset(
        tmp_path / "d.jsonl", n_per_class=6, conditions=("green", "red", "control")
    )


def test_report_stage_end_to_end_and_alpha_change_recomputes_only_steer(tmp_path):
    dataset = _dataset(tmp_path)
    first = run_experiment(compose_config(_overrides(tmp_path, dataset)), tmp_path / "r1")
    assert set(first) == {"prompts", "capture", "directions", "baseline", "steer", "report"}
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["swap"]["all"]["n"] == 12
    assert len(report["random_baseline"]["all"]["random_rates"]) == 3
    assert report["controls"]["n"] == 6
    md = (tmp_path / "r1" / "report.md").read_text()
    assert md.startswith("# Colour swap")
    # reflect (the default mode): the bound on its swap, the direction's CV accuracy at layer 2
    acc = report["direction"]["per_layer"]["2"]["cv_accuracy"]
    assert f"so this bounds the swap) | {100 * acc:.1f}% |" in md
    assert (tmp_path / "r1" / "layers.png").stat().st_size > 1000
    gens = pd.read_parquet(Path(first["steer"]["path"]) / "generations.parquet")
    assert set(gens["direction"]) == {"main", "random-00", "random-01", "random-02"}

    second = run_experiment(
        compose_config(_overrides(tmp_path, dataset, "steer.alpha=2.0")), tmp_path / "r2"
    )
    recomputed = {name for name, r in second.items() if not r["cached"]}
    assert recomputed == {"steer", "report"}


def test_overridden_dataset_path_runs_unchanged(tmp_path):
    other = write_dataset(
        tmp_path / "other.jsonl", n_per_class=3, conditions=("green", "red", "control")
    )
    res = run_experiment(compose_config(_overrides(tmp_path, other)), tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["swap"]["all"]["n"] == 6 and report["controls"]["n"] == 3
    assert 0.0 <= res["report"]["summary"]["swap_rate_all"] <= 1.0


def test_multirun_sweep_writes_summary_and_captures_once(tmp_path):
    dataset = _dataset(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "mlx_interp.apps.cli",
        "-m",
        *_overrides(tmp_path, dataset, "steer.alpha=0.5,1.5", "steer.layer=1,2"),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = pd.read_parquet(tmp_path / "sweep" / "summary.parquet")
    assert len(summary) == 4
    assert set(summary["steer.alpha"]) == {0.5, 1.5}
    assert summary["swap_all"].between(0, 1).all()
    assert (tmp_path / "sweep" / "summary.md").exists()
    assert (tmp_path / "sweep" / "swap_vs_alpha.png").exists()
    captures = [
        p for p in (tmp_path / "outputs" / "artifacts" / "capture").iterdir() if len(p.name) == 64
    ]
    assert len(captures) == 1  # captured once for the whole sweep
    steers = [
        p for p in (tmp_path / "outputs" / "artifacts" / "steer").iterdir() if len(p.name) == 64
    ]
    assert len(steers) == 4


@pytest.mark.parametrize(
    "override,message",
    [
        ("steer.alpha=nan", "finite"),
        ("steer.layer=9", "out of range"),
        ("steer.mode=sideways", "sideways"),
    ],
)
def test_bad_steering_input_is_a_clear_error(tmp_path, override, message):
    dataset = _dataset(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mlx_interp.apps.cli", *_overrides(tmp_path, dataset, override)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
