"""Shared fixtures: tiny models of every architecture, the real embedded model, the composed
config and a temporary artifact store. Importing ``mlx_interp`` first loads the optimized
BLAS before mlx (importing mlx first is refused: see ``mlx_interp.blas``)."""

from __future__ import annotations

import pytest

import mlx_interp  # noqa: F401  (loads the optimized BLAS before mlx)
from tests.helpers import compose_config
from tests.tiny_models import ARCHS, tiny_model


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    """(architecture name, tiny random-weight mlx-lm model) for each supported architecture."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as loaded from its GGUF: (model, tokenizer)."""
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
