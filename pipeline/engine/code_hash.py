"""The code a stage's artifact depends on, hashed: its module and the project modules it imports.

A cached result must follow the code that made it (as DVC hashes a stage's declared code
dependencies), not a hand-bumped version. The code of a stage is its own module (where its
``run`` is defined) and every ``mlx_interp`` module it imports, transitively: found by
parsing the ``import`` statements of each file, those inside functions too (a lazy import is
still a dependency), never by running them. Not followed: parent packages (``import
mlx_interp.analysis.directions`` depends on ``directions.py``, not on every module the
package's ``__init__`` names); the engine (:data:`ENGINE`: the store, the runner, the
validator decide where a result is kept and whether a stage runs, not what it computes, and
what the schema decides, defaults, types and choices, reaches a stage only through its
config slice, which the key hashes; so editing the engine keeps the cache); other
distributions (mlx, numpy: ``provenance.json`` records their versions).

The hash is sha256 over (module name, sha256 of the file's bytes) in module-name order: the
same sources give the same hash on every machine, whatever the paths, times or order of
imports. Each module's closure is computed once per process.

Threads: ranks of a sharded run (and notebooks) may key stages from several threads at once.
CPython 3.11's ``ast.parse`` keeps its recursion depth in per-interpreter state, so two threads
parsing together can fail with ``SystemError: AST constructor recursion depth mismatch``
(CPython gh-106905; it failed a CI run here on 3.11.7). Parsing therefore holds one lock, and
the once-per-process closure is computed under it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path

PROJECT = "mlx_interp"  # the package whose modules are followed
ENGINE = "mlx_interp.engine"  # not followed: not a stage's code (see the module docstring)

Locate = Callable[[str], Path | None]  # module name -> its source file (None: not a module)

_PARSE = threading.Lock()  # ast.parse is not thread-safe on CPython 3.11 (module docstring)

__all__ = ["ENGINE", "PROJECT", "code_digest", "module_sources", "source_closure"]


def locate_module(name: str) -> Path | None:
    """The source file of an importable module (None for a name that is not a module)."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):  # a name inside a module, not one
            return None
        origin = spec.origin if spec is not None else None
    if origin is None or not origin.endswith(".py"):
        return None
    return Path(origin)


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``),
    relative imports resolved against ``module``."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_bytes()
    with _PARSE:
        tree = ast.parse(source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def source_closure(module: str, locate: Locate = locate_module) -> dict[str, Path]:
    """``module`` and every project module it imports, transitively: name -> source file."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = locate(name)
        if path is None:
            continue
        found[name] = path
        for target in imported_names(path, name):
            if target in found or target == ENGINE or target.startswith(ENGINE + "."):
                continue
            if target == PROJECT or target.startswith(PROJECT + "."):
                todo.append(target)
    return found


def module_sources(module: str, locate: Locate = locate_module) -> dict[str, str]:
    """Module name -> sha256 of its file's bytes, for ``module``'s closure, sorted by name."""
    closure = source_closure(module, locate)
    return {
        name: hashlib.sha256(closure[name].read_bytes()).hexdigest() for name in sorted(closure)
    }


def code_digest(sources: dict[str, str]) -> str:
    """One sha256 over (module name, file hash) pairs in module-name order."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(f"{name}\0{sources[name]}\n".encode())
    return h.hexdigest()


_STAGE_SOURCES: dict[str, dict[str, str]] = {}
_ONCE = threading.Lock()


def stage_sources(module: str) -> dict[str, str]:
    """:func:`module_sources` of a stage's module, computed once per process (thread-safe)."""
    with _ONCE:
        if module not in _STAGE_SOURCES:
            _STAGE_SOURCES[module] = module_sources(module)
        return _STAGE_SOURCES[module]
