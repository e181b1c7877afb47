"""Where the packaged configs (``conf/``) and datasets (``datasets/``) live.

Both ship inside the package as data folders without ``__init__.py`` (``mlx_interp/conf``,
``mlx_interp/datasets``), so neither is an importable top-level package when Python starts in
the repository root (``import datasets`` finds Hugging Face ``datasets``, not ours). The same
code serves an installed wheel (the folders inside site-packages) and the strict editable
install ``make setup`` makes, whose ``mlx_interp/`` is a tree of links to the checkout's files:
there the links are followed back to the checkout's own ``conf/`` and ``datasets/``, so a
config or dataset added to the checkout is seen without re-installing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shipped_folder(name: str) -> Path:
    """The folder ``mlx_interp/<name>`` really is: inside the installed package, or the
    checkout's ``<name>/`` when the install links to it (or maps it, as an import-hook
    editable install does)."""
    spec = importlib.util.find_spec(f"mlx_interp.{name}")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        first = next((p for p in sorted(folder.iterdir()) if p.is_file()), None)
        return first.resolve().parent if first is not None and first.is_symlink() else folder
    here = Path(__file__).resolve().parent  # pipeline/ in a checkout
    if here.name == "pipeline" and (here.parent / name).is_dir():
        return here.parent / name
    raise ImportError(f"mlx_interp.{name} is not installed: run `make setup` (pip install -e .)")


CONF_DIR = str(shipped_folder("conf"))  # Hydra's config directory (a file path)
DATA_ROOT = shipped_folder("datasets").parent  # relative dataset paths start here
