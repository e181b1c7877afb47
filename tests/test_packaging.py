"""The built wheel holds the whole package (code, configs, datasets) and runs from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"pipeline": "mlx_interp", "stages": "mlx_interp/stages", "conf": "mlx_interp/conf"}
FOLDERS["datasets"] = "mlx_interp/datasets"


def _expected() -> set[str]:
    """Where every tracked source, config and dataset file lands inside the wheel."""
    tracked = subprocess.run(
        ["git", "ls-files", *FOLDERS], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    out = set()
    for name in tracked:
        top, _, rest = name.partition("/")
        if Path(name).suffix in (".py", ".yaml", ".jsonl", ".json"):
            out.add(f"{FOLDERS[top]}/{rest}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("mlx_interp-*.whl")
    return path


def test_the_wheel_holds_code_configs_and_datasets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected() - names)
    assert missing == [], "add new config group folders to pyproject's packages list"
    assert "mlx_interp/conf/config.yaml" in names
    assert "mlx_interp/datasets/color_swap.jsonl" in names
    assert not any(n.startswith(("pipeline/", "stages/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for script in ("mlx-interp =", "mlx-interp-chat =", "mlx-interp-cv ="):
        assert script in scripts


def test_the_installed_wheel_runs_an_experiment_from_another_directory(wheel, tmp_path):
    """Installed (not editable) into a folder, it finds its own configs and datasets."""
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import mlx_interp.resources as r; print(r.CONF_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == target / "mlx_interp" / "conf"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_interp.apps.cli", "experiment=capture_only"]
        + ["model=tiny_random", "paths.outputs=out", "hydra.run.dir=out/run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((work / "out" / "artifacts" / "capture").glob("*/_manifest.json"))
