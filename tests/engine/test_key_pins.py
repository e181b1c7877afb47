"""Artifact keys stay put: a refactor of the engine or of a stage's declaration must not
change the key of an artifact computed before it (every cached result would be recomputed,
or a run folder would no longer match its artifacts).

``key_pins.json`` holds, for the default config, ``experiment=color_swap`` and
``experiment=sycophancy_3way`` as composed on 2026-12-05: the plain config, each stage's file
fingerprints (dataset and model checksums) and the keys the engine gave them. The keys are
recomputed here from that snapshot, so a later edit of a dataset or a config default does
not break this test; a change of how keys are made does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlx_interp.engine.cache import file_sha256
from mlx_interp.engine.dag import stage_keys
from mlx_interp.io.datasets import resolve_dataset_path
from mlx_interp.stages import STAGES
from tests.helpers import compose_config

PINS = json.loads((Path(__file__).with_name("key_pins.json")).read_text(encoding="utf-8"))


def _pinned_fingerprints(fingerprints: dict) -> dict:
    """The registry with each stage's fingerprint replaced by the snapshot's."""

    def pinned(name: str):
        return lambda *_: dict(fingerprints.get(name, {}))

    return {n: dataclasses.replace(s, fingerprint=pinned(n)) for n, s in STAGES.items()}


@pytest.mark.parametrize("name", sorted(PINS))
def test_keys_of_the_shipped_configs_are_pinned(name):
    pin = PINS[name]
    cfg = {**pin["config"], "paths": {}}
    keys = stage_keys(_pinned_fingerprints(pin["fingerprints"]), cfg["pipeline"]["stages"], cfg)
    assert keys == pin["keys"]


def test_fingerprints_are_made_as_before():
    """The live fingerprints of the default config: the model's checksum as pinned, the
    dataset's that of the file today (datasets change; how they are hashed does not)."""
    pin = PINS["default"]
    plain = OmegaConf.to_container(compose_config(pin["overrides"]), resolve=True)
    targets = plain["pipeline"]["stages"]
    live = {}
    for name in stage_keys(STAGES, targets, plain):
        stage = STAGES[name]
        live[name] = stage.fingerprint(_inputs(plain, stage)) if stage.fingerprint else {}
    want = json.loads(json.dumps(pin["fingerprints"]))
    dataset = resolve_dataset_path(plain["concept"]["dataset"])
    want["prompts"]["dataset_sha256"] = file_sha256(dataset)
    assert live == want


def _inputs(plain: dict, stage) -> object:
    from mlx_interp.engine.dag import config_slice, stage_inputs

    return stage_inputs(stage, config_slice(plain, stage))
