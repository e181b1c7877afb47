"""Packaging: the built wheel holds the whole package (code, configs, datasets) and runs from
anywhere; the venv's ``mlx_interp`` is this checkout's, with every module linked; no folder of
the repository shadows a well-known package when Python starts in its root."""

from __future__ import annotations

import importlib.util
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
    assert missing == [], "pyproject's package-data globs miss these files"
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


def test_mlx_interp_is_this_checkouts_code():
    """A venv made in another checkout would silently test that checkout's code."""
    import mlx_interp
    import mlx_interp.stages

    for module, folder in ((mlx_interp, ROOT / "pipeline"), (mlx_interp.stages, ROOT / "stages")):
        where = Path(str(module.__file__)).resolve()
        assert where == folder / "__init__.py", (
            f"{module.__name__} is imported from {where}, not from this checkout ({folder}): "
            f"the venv {sys.prefix} was made elsewhere; run `make setup` here"
        )


def test_every_module_of_the_checkout_is_installed():
    """The strict editable install links files at install time: a module added since needs
    `make setup` (any make target re-links when the module list changes)."""
    for package, folder in (
        ("mlx_interp", ROOT / "pipeline"),
        ("mlx_interp.stages", ROOT / "stages"),
    ):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if folder == ROOT / "pipeline" and parts[0] == "stages":
                continue
            name = ".".join([package, *(p for p in parts if p != "__init__")])
            spec = importlib.util.find_spec(name)
            origin = None if spec is None or spec.origin is None else Path(spec.origin).resolve()
            assert origin == path, f"{name} is not installed from {path}: run `make setup`"


def test_configs_and_datasets_are_read_from_this_checkout():
    from mlx_interp.resources import CONF_DIR, DATA_ROOT

    assert Path(CONF_DIR) == ROOT / "conf" and DATA_ROOT == ROOT


def test_data_folders_are_not_python_packages():
    """conf/ and datasets/ ship as package data: no __init__.py, so `import datasets` (or
    conf) from the repository root is never the project's folder."""
    assert sorted(ROOT.glob("conf/**/__init__.py")) == []
    assert sorted(ROOT.glob("datasets/**/__init__.py")) == []


def test_import_datasets_in_the_repository_root_finds_the_installed_package(tmp_path):
    """Python started in the repository root (sys.path[0] is the root) imports an installed
    `datasets` (Hugging Face's; here a stand-in on PYTHONPATH), not the project's folder."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    code = "import datasets, sys; print(datasets.WHO, sys.path[0] == '')"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.stdout.split() == ["installed", "True"], out.stderr[-2000:]
    real = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; s = u.find_spec('datasets'); "
            "print(s.origin if s else None)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert real in ("None", "") or not Path(real).resolve().is_relative_to(ROOT / "datasets")


@pytest.mark.slow
def test_the_package_type_checks_clean():
    """`make lint`'s type checker (mypy, configured in pyproject) finds no error."""
    pytest.importorskip("mypy", reason="mypy comes with the dev extra: run `make setup`")
    out = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    hint = "\n(paths under build/__editable__*/mlx_interp/ are pipeline/ and stages/; `make lint`)"
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:] + hint
