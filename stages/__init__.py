"""The stages of the DAG; ``STAGES`` is the registry the runner uses.

Each module here that declares a :class:`~mlx_interp.engine.dag.Stage` at module level
(``STAGE = Stage(...)``: its inputs, upstream stages, files, report and headline) is a stage
module; this package only collects those declarations by name. The other modules are helpers
of one or more stages (plots, report text, tables).
"""

if __name__ != "mlx_interp.stages":  # the folder stages/ is installed as mlx_interp.stages
    raise ImportError(f"import mlx_interp.stages, not {__name__!r} (pip install -e .)")

import importlib
import pkgutil

from mlx_interp.engine.dag import PipelineError, Stage


def collect(package: str, path) -> dict[str, Stage]:
    """Every Stage declared at module level in the modules of ``package`` (at ``path``), by
    name, modules in name order; two stages of one name are an error."""
    found: dict[str, Stage] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for value in vars(module).values():
            if not isinstance(value, Stage) or found.get(value.name) is value:
                continue
            if value.name in found:
                raise PipelineError(
                    f"two stages are named {value.name!r} ({module.__name__} and another "
                    "module): rename one"
                )
            found[value.name] = value
    return found


STAGES: dict[str, Stage] = collect(__name__, __path__)
