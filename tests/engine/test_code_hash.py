"""Code in the cache key: a stage's key follows the source of its module and of the project
modules it imports, and nothing else. Edits are made on a copy of the package, never on this
checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_interp.engine.dag as dag
from mlx_interp.engine.cache import ArtifactStore
from mlx_interp.engine.code_hash import (
    ENGINE,
    code_digest,
    imported_names,
    module_sources,
    source_closure,
)
from mlx_interp.engine.dag import run_stages
from mlx_interp.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def test_a_stage_depends_on_its_module_and_the_library_it_imports():
    sources = STAGES["directions"].sources
    assert {"mlx_interp.stages.directions", "mlx_interp.analysis.directions"} <= set(sources)
    assert "mlx_interp.stages.direction_sites" in sources  # its helper module
    assert "mlx_interp.interventions.readout" in sources  # imported by the helper: transitive
    assert not [m for m in sources if m.startswith(("mlx_interp.apps", "mlx_interp.api"))]
    assert not [m for m in sources if m.startswith(ENGINE)]  # the engine is not its code
    assert "mlx_interp.stages.steer" not in sources  # another stage
    assert all(len(h) == 64 for h in sources.values())
    assert STAGES["directions"].code == code_digest(sources)
    assert STAGES["steer"].code != STAGES["directions"].code


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import os\n"
        "def f():\n    from mlx_interp.analysis import stats\n"
        "from . import sibling\nfrom .sub import thing\n"
    )
    names = imported_names(path, "mlx_interp.pkg.m")
    assert {"os", "mlx_interp.analysis", "mlx_interp.analysis.stats"} <= names
    assert {"mlx_interp.pkg.sibling", "mlx_interp.pkg.sub", "mlx_interp.pkg.sub.thing"} <= names


def test_the_code_hash_is_the_same_in_another_process_and_folder(tmp_path):
    """File bytes in module-name order: not paths, times, hash seeds or import order."""
    script = (
        "import json, mlx_interp\nfrom mlx_interp.stages import STAGES\n"
        "print(json.dumps({n: s.code for n, s in sorted(STAGES.items(), reverse=True)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {n: s.code for n, s in STAGES.items()}


STAGE_MODULE = """
import json
from dataclasses import dataclass

from mlx_interp.analysis.stats import wilson_interval
from mlx_interp.engine.dag import Stage


@dataclass(frozen=True)
class Inputs:
    data: dict


def run(inputs, upstream, out):
    (out / "ci.json").write_text(json.dumps(wilson_interval(inputs.data["k"], inputs.data["n"])))


STAGE = Stage("ci", run, inputs=Inputs, writes=("ci.json",))
"""


@pytest.fixture
def copied(tmp_path, monkeypatch):
    """A copy of the package's sources, a stage module of its own that imports the library,
    and the engine reading stage sources from the copy: (copy root, stages)."""
    copy = tmp_path / "copy"
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    stage_file = tmp_path / "ci_stage.py"
    stage_file.write_text(STAGE_MODULE)
    spec = importlib.util.spec_from_file_location("ci_stage_example", stage_file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    def locate(name: str) -> Path | None:
        if name == spec.name:
            return stage_file
        if name.startswith("mlx_interp.stages."):
            parts = ["stages", *name.split(".")[2:]]
        elif name.startswith("mlx_interp."):
            parts = ["pipeline", *name.split(".")[1:]]
        else:
            return None
        base = copy.joinpath(*parts)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    monkeypatch.setattr(dag, "stage_sources", lambda name: module_sources(name, locate))
    assert set(source_closure(spec.name, locate)) == {
        spec.name,
        "mlx_interp.analysis.stats",
        "mlx_interp.errors",
    }
    return copy, {"ci": module.STAGE}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_editing_a_library_function_a_stage_uses_recomputes_it(copied, tmp_path):
    copy, stages = copied
    store, cfg = ArtifactStore(tmp_path / "artifacts"), {"data": {"k": 3, "n": 10}}
    first = run_stages(stages, ["ci"], cfg, store)["ci"]
    assert not first.cached and run_stages(stages, ["ci"], cfg, store)["ci"].cached

    _edit(  # an unrelated module: the cached result stands
        copy / "pipeline" / "analysis" / "lens.py", '"""', '"""Edited on a copy by a test. '
    )
    assert run_stages(stages, ["ci"], cfg, store)["ci"].key == first.key

    _edit(  # the library function the stage calls: a new key, computed again
        copy / "pipeline" / "analysis" / "stats.py",
        "    k, n = _check_counts(k, n)\n",
        "    k, n = _check_counts(k, n)  # edited on a copy by a test\n",
    )
    again = run_stages(stages, ["ci"], cfg, store)["ci"]
    assert again.key != first.key and not again.cached
    manifest = json.loads((again.path / "_manifest.json").read_text())
    code = manifest["record"]["code"]  # the key's code part, module by module
    assert set(code) == {"ci_stage_example", "mlx_interp.analysis.stats", "mlx_interp.errors"}


def test_parsing_holds_the_lock_and_threads_share_one_closure(monkeypatch):
    """CPython 3.11's ast.parse fails when two threads parse at once (gh-106905: a CI run here
    failed on it, ranks of a sharded stage keying together), so every parse holds one lock."""
    import ast
    import threading

    import mlx_interp.engine.code_hash as code_hash

    real_parse, held = ast.parse, []

    def parse(*args, **kwargs):
        held.append(code_hash._PARSE.locked())
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(code_hash.ast, "parse", parse)
    monkeypatch.setattr(code_hash, "_STAGE_SOURCES", {})
    results: list = [None] * 4

    def key(rank):
        results[rank] = code_hash.stage_sources("mlx_interp.stages.steer")

    threads = [threading.Thread(target=key, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert held and all(held)  # every parse under the lock
    assert all(r is results[0] for r in results) and "mlx_interp.stages.steer" in results[0]
    assert len(held) == len(results[0])  # the closure was parsed once, not once per thread
