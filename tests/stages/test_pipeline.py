"""The stage DAG end to end on the real stages: caching, recompute rules, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlx_interp.apps.cli import run_experiment
from mlx_interp.io.activations import read_activations
from tests.helpers import compose_config, write_dataset

ROOT = Path(__file__).resolve().parents[2]


def _overrides(tmp_path: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_random",
        f"concept.dataset={dataset}",
        "concept.conditions=[green,red]",
        f"paths.outputs={tmp_path / 'outputs'}",
        "pipeline.stages=[capture]",
        *extra,
    ]


def _run(tmp_path: Path, overrides: list[str], name: str = "run") -> dict:
    return run_experiment(compose_config(overrides), tmp_path / name)


def _sorted_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["prompt_id", "layer", "position"]).reset_index(drop=True)


def test_capture_artifact_schema_and_second_run_is_cached(tmp_path):
    dataset = write_dataset(tmp_path / "d.jsonl", n_per_class=5)
    first = _run(tmp_path, _overrides(tmp_path, dataset), "r1")
    assert not first["prompts"]["cached"] and not first["capture"]["cached"]
    art = Path(first["capture"]["path"])
    df = read_activations(art)
    assert len(df) == 10 * 4  # prompts x layers of the 4-layer tiny model
    assert set(df["layer"]) == {0, 1, 2, 3}
    assert df["vector"].map(len).eq(32).all()
    prompts = pd.read_parquet(Path(first["prompts"]["path"]) / "prompts.parquet")
    last = dict(zip(prompts["prompt_id"], prompts["n_tokens"] - 1, strict=True))
    assert (df["position"] == df["prompt_id"].map(last)).all()
    assert prompts["chat_text"].str.startswith("<|im_start|>system").all()
    assert (tmp_path / "r1" / "artifacts" / "capture" / "activations").is_dir()
    assert json.loads((tmp_path / "r1" / "run.json").read_text())["capture"]["key"]

    second = _run(tmp_path, _overrides(tmp_path, dataset), "r2")
    assert second["prompts"]["cached"] and second["capture"]["cached"]
    assert second["capture"]["key"] == first["capture"]["key"]


def test_capture_knob_does_not_recompute_prompts(tmp_path):
    dataset = write_dataset(tmp_path / "d.jsonl", n_per_class=4)
    first = _run(tmp_path, _overrides(tmp_path, dataset))
    changed = _run(tmp_path, _overrides(tmp_path, dataset, "capture.layers=[0,-1]"))
    assert changed["prompts"]["cached"] and not changed["capture"]["cached"]
    assert changed["prompts"]["key"] == first["prompts"]["key"]
    df = read_activations(Path(changed["capture"]["path"]))
    assert sorted(set(df["layer"])) == [0, 3]
    # same rows for the shared layers: batch size does not change the vectors
    rebatched = _run(tmp_path, _overrides(tmp_path, dataset, "capture.batch_size=3"))
    a = _sorted_rows(read_activations(Path(first["capture"]["path"]), layers=[0]))
    b = _sorted_rows(read_activations(Path(rebatched["capture"]["path"]), layers=[0]))
    np.testing.assert_allclose(np.stack(a["vector"]), np.stack(b["vector"]), atol=1e-5)


def test_editing_the_dataset_recomputes(tmp_path):
    dataset = write_dataset(tmp_path / "d.jsonl", n_per_class=4)
    first = _run(tmp_path, _overrides(tmp_path, dataset))
    write_dataset(dataset, n_per_class=5)  # same path, new content
    second = _run(tmp_path, _overrides(tmp_path, dataset))
    assert not second["prompts"]["cached"] and not second["capture"]["cached"]
    assert second["prompts"]["key"] != first["prompts"]["key"]


def _cli(tmp_path: Path, dataset: Path, outputs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlx_interp.apps.cli",
        "model=tiny_random",
        "model.tiny.hidden_size=256",
        "model.tiny.num_layers=8",
        f"concept.dataset={dataset}",
        "concept.conditions=[green,red]",
        "capture.batch_size=1",
        "pipeline.stages=[capture]",
        f"paths.outputs={outputs}",
    ]


def test_capture_killed_by_sigkill_resumes_and_matches_uninterrupted(tmp_path):
    dataset = write_dataset(tmp_path / "d.jsonl", n_per_class=150)
    outputs = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        _cli(tmp_path, dataset, outputs),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial_parts: list[Path] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial_parts = list(
            (outputs / "artifacts" / "capture").glob("*.partial/activations/part-*")
        )
        if len(partial_parts) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "capture finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(
        list((outputs / "artifacts" / "capture").glob("*.partial/activations/part-*"))
    )
    assert 10 <= done_before < 300
    assert not [p for p in (outputs / "artifacts" / "capture").iterdir() if len(p.name) == 64]

    resumed = subprocess.run(
        _cli(tmp_path, dataset, outputs), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = subprocess.run(
        _cli(tmp_path, dataset, tmp_path / "clean"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert clean.returncode == 0, clean.stderr[-2000:]

    def artifact(outputs: Path) -> Path:
        (path,) = [p for p in (outputs / "artifacts" / "capture").iterdir() if len(p.name) == 64]
        return path

    killed_art, clean_art = artifact(outputs), artifact(tmp_path / "clean")
    assert killed_art.name == clean_art.name  # same content key
    manifest = json.loads((killed_art / "_manifest.json").read_text())
    assert manifest["summary"]["resumed_batches"] >= done_before - 1
    a = _sorted_rows(read_activations(killed_art))
    b = _sorted_rows(read_activations(clean_art))
    assert len(a) == 300 * 8
    pd.testing.assert_frame_equal(a.drop(columns="vector"), b.drop(columns="vector"))
    assert np.array_equal(np.stack(a["vector"]), np.stack(b["vector"]))


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_interp.apps.cli",
            "model=tiny_random",
            f"concept.dataset={tmp_path / 'nope.jsonl'}",
            f"paths.outputs={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert "dataset file not found" in missing.stderr and "concept.dataset=" in missing.stderr
    assert "Traceback" not in missing.stderr
    dataset = write_dataset(tmp_path / "d.jsonl", n_per_class=2)
    layer = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_interp.apps.cli",
            "model=tiny_random",
            f"concept.dataset={dataset}",
            "concept.conditions=[green,red]",
            "capture.layers=[7]",
            f"paths.outputs={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert layer.returncode == 2 and "out of range" in layer.stderr


@pytest.mark.slow
def test_make_run_equivalent_on_embedded_smollm2(tmp_path):
    """The default experiment on the real model: 30 layers of the colour-swap prompts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mlx_interp.apps.cli", f"paths.outputs={tmp_path}"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "activations:" in first.stdout and "30 layers" in first.stdout
    run_dir = Path(first.stdout.split("run directory: ")[1].split()[0])
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "mlx_interp.log").is_file()
    df = read_activations(run_dir / "artifacts" / "capture")
    n_prompts = sum(1 for _ in open(ROOT / "datasets" / "color_swap.jsonl"))
    assert len(df) == n_prompts * 30 and df["vector"].map(len).eq(576).all()
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0
    assert "every stage was cached" in second.stdout
