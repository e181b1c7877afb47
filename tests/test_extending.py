"""docs/extending.md stays true: the files it names exist, and its example stage, exactly as
the page writes it, runs through the DAG and the run folder like any shipped stage."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mlx_interp.apps.cli import _fill_run_dir
from mlx_interp.engine.cache import ArtifactStore
from mlx_interp.engine.dag import headlines, run_stages
from mlx_interp.stages import STAGES
from tests.helpers import compose_config, write_dataset

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
TOP = ("conf/", "datasets/", "pipeline/", "stages/", "tests/")


def test_every_file_and_folder_the_page_names_exists():
    named = {m for m in re.findall(r"`([^`\s]+)`", PAGE) if m.startswith(TOP)}
    assert len(named) > 10
    missing = []
    for path in sorted(named):
        known = path.split("<", 1)[0]  # up to a placeholder such as <name>
        if not (ROOT / known).exists() and not (ROOT / known).parent.is_dir():
            missing.append(path)
        elif "<" not in path and not (ROOT / path).exists():
            missing.append(path)
    assert missing == []


def _example_stage(tmp_path: Path, monkeypatch):
    """The page's python block, imported as a module of its own."""
    (code,) = re.findall(r"```python\n(.*?)```", PAGE, flags=re.S)
    path = tmp_path / "prompt_lengths.py"
    path.write_text(code, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("prompt_lengths_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.STAGE


def test_the_example_stage_runs_through_the_dag_and_the_run_folder(tmp_path, monkeypatch):
    stage = _example_stage(tmp_path, monkeypatch)
    stages = {**STAGES, stage.name: stage}
    dataset = write_dataset(tmp_path / "d.jsonl", n_per_class=3)
    data = [f"concept.dataset={dataset}", "concept.conditions=[green,red]", "concept.fewshot=[]"]
    cfg = compose_config(["model=tiny_random", *data])
    plain = {**OmegaConf.to_container(cfg, resolve=True), "lengths": {"quantile": 1.0}}
    store = ArtifactStore(tmp_path / "artifacts")
    results = run_stages(stages, [stage.name], plain, store)
    assert list(results) == ["prompts", "prompt_lengths"]  # its upstream stage first
    lengths = json.loads((results["prompt_lengths"].path / "lengths.json").read_text())
    assert set(lengths) == {"green", "red"} and all(n > 5 for n in lengths.values())

    summary = {n: {"summary": r.summary, "key": r.key} for n, r in results.items()}
    (head,) = headlines(stages, summary).values()
    assert head.name == "tiny_random longest condition, tokens"
    assert head.value == max(lengths.values())
    _fill_run_dir(tmp_path / "run", results, summary, stages)
    assert json.loads((tmp_path / "run" / "lengths.json").read_text()) == lengths

    again = run_stages(stages, [stage.name], plain, store)
    assert all(r.cached for r in again.values())
    plain["lengths"]["quantile"] = 0.0  # its own config changes its key, not the prompts'
    changed = run_stages(stages, [stage.name], plain, store)
    assert changed["prompts"].cached and not changed["prompt_lengths"].cached
