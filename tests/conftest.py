"""Shared fixtures: tiny models of every architecture, the real embedded model, the composed
config and a temporary artifact store. Importing ``mlx_interp`` first loads the optimized
BLAS before mlx (importing mlx first is refused: see ``mlx_interp.blas``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

import mlx_interp  # noqa: F401  (loads the optimized BLAS before mlx)
from tests.helpers import compose_config
from tests.tiny_models import ARCHS, tiny_model

# Tests decode every GGUF they load (the model load cache's own tests turn it on in a
# temporary folder): a test of the decoder must not be served a prepared model.
os.environ["MLX_INTERP_MODEL_CACHE"] = "off"


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    """(architecture name, tiny random-weight mlx-lm model) for each supported architecture."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as loaded from its GGUF, its Q4_1/Q8_0 layers kept
    quantized (MLX affine, exact): (model, tokenizer)."""
    from mlx_interp.models.gguf import embedded_gguf_path, load_gguf

    return load_gguf(embedded_gguf_path(), keep_quantized=True)


@pytest.fixture(scope="session")
def smollm2_float():
    """The embedded SmolLM2-135M-Instruct dequantized to float32 (as the pipeline runs it on
    the CPU: ~20x faster than the quantized layers there): (model, tokenizer)."""
    from mlx_interp.models.gguf import embedded_gguf_path, load_gguf

    return load_gguf(embedded_gguf_path())


@pytest.fixture(scope="session")
def tiny_lm():
    """The public API's view of the tiny random model (``mlx_interp.load("tiny_random")``)."""
    return mlx_interp.load("tiny_random")


@pytest.fixture
def default_config():
    """The composed root config with no overrides, as `mlx-interp` sees it."""
    return compose_config([])


@pytest.fixture
def store(tmp_path):
    """An empty content-addressed artifact store in a temporary folder."""
    from mlx_interp.engine.cache import ArtifactStore

    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per module: the dataset and an artifact store shared by the cases."""
    from tests.helpers import write_dataset

    root = tmp_path_factory.mktemp("bad_input")
    write_dataset(root / "d.jsonl", n_per_class=4, conditions=("green", "red", "control"))
    return root


@pytest.fixture
def cli_run(workdir, monkeypatch, capsys):
    """Run ``mlx-interp <base overrides> <extra>`` in-process: (exit status, stderr).

    A failing run (exit status not 0) must leave every artifact completed before it as it
    was: the store is snapshotted (sha256 of every file) before and compared after.
    """
    import mlx_interp.apps.cli as cli
    from tests.helpers import _base, changed_artifacts, store_snapshot

    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level

    def run(*extra: str, base: list[str] | None = None) -> tuple[int, str]:
        given = {e.split("=", 1)[0].lstrip("+") for e in extra}  # extra replaces a base one
        base = [b for b in (base or _base(workdir)) if b.split("=", 1)[0] not in given]
        flags = [e for e in extra if e.startswith("-")]  # -m and the like go first
        argv = [*flags, *base, *(e for e in extra if not e.startswith("-"))]
        outputs = next((a.split("=", 1)[1] for a in argv if a.startswith("paths.outputs=")), None)
        store = Path(outputs or workdir / "outputs").expanduser() / "artifacts"
        before = store_snapshot(store)
        monkeypatch.setattr(sys, "argv", ["mlx-interp", *argv])
        try:
            cli.main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            root_logger.handlers[:] = handlers  # Hydra reconfigures logging per run
            root_logger.setLevel(level)
        err = capsys.readouterr().err
        if code not in (0, None):
            changed = changed_artifacts(before, store_snapshot(store))
            assert not changed, f"a failed run changed earlier artifacts: {changed[:5]}"
        return code, err

    return run
