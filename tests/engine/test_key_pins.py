"""Artifact keys stay put: a refactor of the engine or of a stage's declaration must not
change the key of an artifact computed before it (every cached result would be recomputed,
or a run folder would no longer match its artifacts).

A key has a config part (the stage's name, config slice, file fingerprints and upstream
keys) and a code part (the hash of the stage's sources, :mod:`mlx_interp.engine.code_hash`).
``key_pins.json`` holds, for the default config, ``experiment=color_swap`` and
``experiment=sycophancy_3way`` as composed on 2026-12-05: the plain config, each stage's file
fingerprints and the keys with the code part pinned to the stage's module name. The keys are
recomputed here from that snapshot, so a later edit of a dataset, a config default or any
code does not break this test; a change of how keys are made does. The code part is tested
in tests/engine/test_code_hash.py. (The keys pinned before the code part existed, with
hand-bumped versions instead, are in the git history of this file: every key changed once,
on purpose, when code hashing came in. The keys of ``steer`` and the stages after it
changed on purpose once more, on 2026-12-05, when ``steer`` came to read the ``baseline``
stage's unsteered states: its upstream keys now include the baseline's.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mlx_interp.engine.dag as dag
from mlx_interp.engine.cache import file_sha256
from mlx_interp.engine.dag import config_slice, stage_inputs, stage_keys
from mlx_interp.io.datasets import resolve_dataset_path
from mlx_interp.stages import STAGES
from tests.helpers import compose_config

PINS = json.loads((Path(__file__).with_name("key_pins.json")).read_text(encoding="utf-8"))


def _pinned_fingerprints(fingerprints: dict) -> dict:
    """The registry with each stage's fingerprint replaced by the snapshot's."""

    def pinned(name: str):
        return lambda *_: dict(fingerprints.get(name, {}))

    return {n: dataclasses.replace(s, fingerprint=pinned(n)) for n, s in STAGES.items()}


@pytest.fixture
def pinned_code(monkeypatch):
    """The code part of every key: a function of the stage's module name only."""
    monkeypatch.setattr(dag, "stage_sources", lambda module: {"pinned": module})


@pytest.mark.parametrize("name", sorted(PINS))
def test_keys_of_the_shipped_configs_are_pinned(name, pinned_code):
    pin = PINS[name]
    cfg = {**pin["config"], "paths": {}}
    keys = stage_keys(_pinned_fingerprints(pin["fingerprints"]), cfg["pipeline"]["stages"], cfg)
    assert keys == pin["keys"]


def test_the_code_part_changes_every_key(pinned_code, monkeypatch):
    pin = PINS["default"]
    cfg = {**pin["config"], "paths": {}}
    stages = _pinned_fingerprints(pin["fingerprints"])
    monkeypatch.setattr(dag, "stage_sources", lambda module: {"edited": module})
    keys = stage_keys(stages, cfg["pipeline"]["stages"], cfg)
    assert set(keys) == set(pin["keys"])
    assert all(keys[n] != pin["keys"][n] for n in keys)


def test_fingerprints_are_made_as_before():
    """The live fingerprints of the default config: the model's checksum as pinned, the
    dataset's that of the file today (datasets change; how they are hashed does not)."""
    pin = PINS["default"]
    plain = OmegaConf.to_container(compose_config(pin["overrides"]), resolve=True)
    targets = plain["pipeline"]["stages"]
    live = {}
    for name in stage_keys(STAGES, targets, plain):
        stage = STAGES[name]
        inputs = stage_inputs(stage, config_slice(plain, stage))
        live[name] = stage.fingerprint(inputs) if stage.fingerprint else {}
    want = json.loads(json.dumps(pin["fingerprints"]))
    dataset = resolve_dataset_path(plain["concept"]["dataset"])
    want["prompts"]["dataset_sha256"] = file_sha256(dataset)
    assert live == want
