"""Every conf/model_concept file composes, validates and applies to its model only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mlx_interp.engine.validate import validate_config
from mlx_interp.resources import CONF_DIR
from tests.helpers import compose_config

FILES = sorted((Path(CONF_DIR) / "model_concept").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def _split(stem: str) -> tuple[str, str]:
    model = max((m for m in MODELS if stem.startswith(m + "_")), key=len)
    return model, stem[len(model) + 1 :]


def _holds(got, want) -> bool:
    """Whether the composed value holds everything the file gives (schema defaults aside)."""
    if isinstance(want, dict):
        return all(_holds(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return len(got) == len(want) and all(_holds(g, w) for g, w in zip(got, want, strict=True))
    return got == want


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_model_concept_file_applies_to_its_model(path):
    model, concept = _split(path.stem)
    cfg = compose_config([f"model={model}", f"concept={concept}"])
    validate_config(OmegaConf.to_container(cfg, resolve=True))
    want = yaml.safe_load(path.read_text())
    got = OmegaConf.to_container(cfg, resolve=True)
    for group, values in want.items():
        assert _holds(got[group], values), group
    other = next(m for m in ("smollm2_135m", "gemma3_270m") if m != model)
    plain = OmegaConf.to_container(
        compose_config([f"model={other}", f"concept={concept}"]), resolve=True
    )
    assert not all(_holds(plain[g], v) for g, v in want.items())  # not applied to another model


def test_the_colour_swap_has_a_setting_for_both_embedded_models():
    stems = {p.stem for p in FILES}
    assert {"smollm2_135m_color_swap", "gemma3_270m_color_swap"} <= stems
