"""Config composition: every experiment and model composes; typos fail at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mlx_interp.apps.cli import CONF_DIR
from tests.helpers import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def test_default_config_is_complete(default_config):
    cfg = default_config
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "embedded"
    assert cfg.concept.name == "color_swap"
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    OmegaConf.resolve(cfg)
    assert cfg.pipeline.stages, experiment


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model):
    overrides = [f"model={model}"] + (["model.path=/some/file.gguf"] if model == "gguf" else [])
    cfg = compose_config(overrides)
    assert cfg.model.name


@pytest.mark.parametrize(
    "override",
    ["capture.batchsize=4", "model.dequantise=auto", "prompts.fromat=chat", "nonexistent=1"],
)
def test_typo_in_override_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_config(["capture.batch_size=abc"])


def test_unknown_group_option_names_the_choices():
    with pytest.raises(ConfigCompositionException, match="smollm2_135m"):
        compose_config(["model=no_such_model"])


SCHEMAS = {  # the stage groups (model and concept files name their choices in full)
    "prompts": "PromptsConfig",
    "capture": "CaptureConfig",
    "directions": "DirectionsConfig",
    "score": "ScoreConfig",
    "steer": "SteerConfig",
    "probes": "ProbesConfig",
    "contamination": "ContaminationConfig",
    "report": "ReportConfig",
}


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_group_files_do_not_repeat_schema_defaults(group):
    """The dataclass schema is the one source of defaults: a group file that writes a value
    equal to the schema's default is a second copy that can drift (as max_tokens 8 vs 12 did)."""
    from omegaconf import OmegaConf

    from mlx_interp.engine import schema

    defaults = OmegaConf.to_container(OmegaConf.structured(getattr(schema, SCHEMAS[group])))
    repeated = []
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        for key, value in values.items():
            if key != "defaults" and key in defaults and defaults[key] == value:
                repeated.append(f"{path.name}: {key}")
    assert repeated == []
