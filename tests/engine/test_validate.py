"""The one config check: every shipped experiment and model passes it; its rules bite."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlx_interp.apps.cli import CONF_DIR
from mlx_interp.engine.validate import template_fields, validate_config
from mlx_interp.errors import ConfigError, MlxInterpError
from tests.helpers import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml") if p.stem != "gguf")


def _plain(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(overrides), resolve=True)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_and_model_passes(experiment, model):
    validate_config(_plain([f"experiment={experiment}", f"model={model}"]))


def test_gguf_model_with_a_path_passes():
    validate_config(_plain(["model=gguf", "model.path=/m/x.gguf"]))


@pytest.mark.parametrize(
    "override,words",
    [
        ("+capture.batchsize=4", "unknown config key capture.batchsize"),
        ("+score.fluency.ngrams=2", "did you mean score.fluency.ngram?"),
        ("capture.positions=middle", "capture.positions must be one of"),
        ("steer.alpha=-2000", "steer.alpha must be a finite number"),
        ("score.fluency.instruction='{txt}'", "score.fluency.instruction must be a template"),
        ("concept.conditions=[red,red]", "concept.conditions must be null (all) or"),
        ("localize.kinds=[resid,heads]", "localize.kinds must be a non-empty list of"),
        ("localize.kinds=[]", "localize.kinds must be a non-empty list of"),
    ],
)
def test_rules_name_key_value_and_example(override, words):
    with pytest.raises(ConfigError) as info:
        validate_config(_plain([override]))
    assert words in str(info.value)
    fix = "fix the spelling" if override.startswith("+") else "e.g. "
    assert fix in str(info.value)
    assert isinstance(info.value, MlxInterpError) and isinstance(info.value, ValueError)


def test_free_form_mappings_are_not_checked_for_keys():
    validate_config(_plain(["+score.swap.blue=pink"]))
    validate_config(_plain(["+directions.contrast.extra=x"]))


def test_template_fields():
    assert template_fields("Q: {text} and {text}") == ["text"]
    assert template_fields("{text} {other}") == ["other", "text"]
    with pytest.raises(ValueError):
        template_fields("{")
