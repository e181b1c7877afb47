"""The package's layers: imports point down only, no import cycles, stages stay apart.

Every ``import`` in ``pipeline/`` (the package ``mlx_interp``) and ``stages/``
(``mlx_interp.stages``) counts, also the ones inside functions: a lazy import that hides a
cycle is still a cycle. The layer table is the one in docs/layout.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"mlx_interp": ROOT / "pipeline", "mlx_interp.stages": ROOT / "stages"}

# lowest first; a module may import its own layer and the ones below it
LAYERS = [
    (
        "base",
        ["mlx_interp.blas", "mlx_interp.errors", "mlx_interp.factory", "mlx_interp.resources"],
    ),
    ("engine", ["mlx_interp.engine"]),
    ("models", ["mlx_interp.models"]),
    ("interventions", ["mlx_interp.interventions"]),
    ("analysis", ["mlx_interp.analysis"]),
    ("io", ["mlx_interp.io"]),
    ("api", ["mlx_interp.api"]),
    ("stages", ["mlx_interp.stages"]),
    ("apps", ["mlx_interp.apps"]),
]


def _stage_modules() -> set[str]:
    """Modules of stages/ that declare DAG stages (the rest are helpers, e.g. plots)."""
    from mlx_interp.stages import STAGES

    return {stage.run.__module__.rpartition(".")[2] for stage in STAGES.values()}


STAGE_MODULES = _stage_modules()


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (at the top or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("mlx_interp"):
                out.add(name)
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    """Rank of ``module`` in :data:`LAYERS`; None for the package roots (the public face)."""
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    roots = {"mlx_interp", "mlx_interp.conf", "mlx_interp.datasets"}
    assert [m for m in MODULES if _layer(m) is None and m not in roots] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    rank = _layer(module)
    if rank is None:  # mlx_interp/__init__: the BLAS loader and the public face (lazy)
        return
    upward = [
        f"{target} ({LAYERS[_layer(target)][0]})"
        for target in sorted(GRAPH[module])
        if target != "mlx_interp" and (_layer(target) or 0) > rank
    ]
    assert upward == [], f"{module} ({LAYERS[rank][0]}) imports a higher layer"


def test_no_import_cycles():
    from graphlib import CycleError, TopologicalSorter

    graph = {m: {t for t in targets if t != "mlx_interp"} for m, targets in GRAPH.items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_stages_do_not_import_each_other():
    crossing = []
    for module, targets in GRAPH.items():
        name = module.rpartition(".")[2]
        if not module.startswith("mlx_interp.stages.") or name not in STAGE_MODULES:
            continue
        for target in targets:
            other = target.rpartition(".")[2]
            if target.startswith("mlx_interp.stages.") and other in STAGE_MODULES:
                crossing.append(f"{module} -> {target}")
    assert crossing == []


def test_the_check_sees_a_planted_violation(tmp_path):
    """The parser finds an upward import inside a function (so the checks above can fail)."""
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from mlx_interp.apps.cli import main\n")
    assert _imports(planted) == {"mlx_interp.apps.cli"}
    assert _layer("mlx_interp.apps.cli") > _layer("mlx_interp.engine.cache")
