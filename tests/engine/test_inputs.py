"""Typed stage inputs: built from the plain slice the key hashes, equal to it, choices as enums."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlx_interp.engine.dag import config_slice, stage_inputs
from mlx_interp.engine.inputs import choice_fields, input_keys, typed
from mlx_interp.engine.schema import (
    CapturePositions,
    PatchKind,
    RootConfig,
    ScoreConfig,
    SteerPositions,
)
from mlx_interp.engine.validate import validate_config
from mlx_interp.errors import ConfigError
from mlx_interp.resources import CONF_DIR
from mlx_interp.stages import STAGES
from tests.helpers import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def _json(value) -> object:
    return json.loads(json.dumps(value, sort_keys=True))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_stage_sees_exactly_the_slice_its_key_hashes(experiment):
    plain = OmegaConf.to_container(compose_config([f"experiment={experiment}"]), resolve=True)
    for stage in STAGES.values():
        cfg_slice = config_slice(plain, stage)
        inputs = stage_inputs(stage, cfg_slice)
        assert input_keys(type(inputs)) == stage.reads
        assert _json(dataclasses.asdict(inputs)) == _json(cfg_slice), stage.name


def test_choice_fields_become_their_enum_members_and_defaults_fill_gaps():
    root = typed(RootConfig, {"capture": {"positions": "mean"}, "steer": {"positions": "last"}})
    assert root.capture.positions is CapturePositions.mean and root.capture.batch_size == 16
    assert root.steer.positions == "last" and root.steer.positions is SteerPositions.last
    assert root.localize.kinds == [PatchKind.resid]  # defaults stay as the schema writes them
    score = typed(ScoreConfig, {"fluency": {"n_prompts": 3}, "swap": {"a": "b"}})
    assert score.fluency.n_prompts == 3 and score.fluency.max_tokens == 32
    assert score.swap == {"a": "b"}  # a free-form mapping is kept as given
    with pytest.raises(ConfigError, match=r"capture.positions must be one of .*'middle'"):
        typed(RootConfig, {"capture": {"positions": "middle"}})


def test_the_validator_checks_every_choice_the_schema_declares():
    keys = {key for key, _, _ in choice_fields(RootConfig)}
    assert {"capture.positions", "steer.positions", "directions.site", "localize.kinds"} <= keys
    plain = OmegaConf.to_container(compose_config(["directions.fit_split=some"]), resolve=True)
    with pytest.raises(ConfigError, match=r"directions.fit_split must be one of \("):
        validate_config(plain)


def test_inputs_must_be_a_frozen_dataclass():
    @dataclasses.dataclass
    class Loose:
        seed: int

    with pytest.raises(TypeError, match="frozen"):
        input_keys(Loose)
    with pytest.raises(TypeError, match="frozen dataclass"):
        input_keys(dict)
