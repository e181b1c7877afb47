"""Where the packaged configs (``conf/``) and datasets (``datasets/``) live.

The same code serves an editable checkout (the repository's ``conf/`` and ``datasets/``) and
an installed wheel (``mlx_interp/conf``, ``mlx_interp/datasets`` inside site-packages).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONF_DIR = str(files("mlx_interp.conf"))  # Hydra's config directory (a file path)
DATA_ROOT = Path(str(files("mlx_interp.datasets"))).parent  # relative dataset paths start here
