"""Two-way steering decided by a gate probe, greedy answers to every question and a dataset's
variants in their own column, end to end on the planted tiny model (tests/stages/planted.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mlx_interp.apps.cli import run_experiment
from tests.helpers import compose_config
from tests.stages.planted import plant, planted_dataset, planted_overrides


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    overrides = [
        *planted_overrides(root, planted_dataset(root / "d.jsonl", wordings=True)),
        "directions.fit_split=train",
        "directions.gate={measured: last, layer: 0}",
        "steer/mode=add",
        "steer.layer=2",
        "steer.alpha=3.0",
        "steer.positions=last",
        "steer.n_random=2",
        "steer.confirm_n=1000",  # more than the questions: a greedy answer to each
        "score.fluency.n_prompts=2",
        "report.plots=false",
        "pipeline.stages=[report]",
    ]
    cfg = compose_config(overrides)
    plant(cfg)
    results = run_experiment(cfg, root / "run")
    steer = Path(results["steer"]["path"])
    report = json.loads((root / "run" / "report.json").read_text())
    return root, pd.read_parquet(steer / "generations.parquet"), report


def test_each_prompt_is_steered_toward_the_other_class(gated):
    root, gens, report = gated
    assert "side" in gens and set(gens["side"]) <= {"pos", "neg", "other"}
    main = gens[(gens["direction"] == "main") & (gens["scorer"] == "logit")]
    own = main["condition"].map({"red": "pos", "green": "neg", "control": "other"})
    assert (main["side"] == own).all()  # the planted class is read at layer 0
    assert report["gate"]["all"]["rate"] == 1.0  # the bound, on test questions
    assert report["bidirectional_swap"] >= 0.8
    steer = json.loads((Path(root) / "run" / "report.json").read_text())["steer"]
    assert steer["gate"]["layer"] == 0 and steer["gate"]["cv_accuracy"] == 1.0


def test_greedy_answers_count_every_question(gated):
    _, gens, report = gated
    questions = gens[(gens["scorer"] == "logit") & (gens["direction"] == "main")]
    greedy = gens[(gens["scorer"] == "generate") & (gens["direction"] == "main")]
    assert set(questions["prompt_id"]) == set(greedy["prompt_id"])
    assert set(report["greedy"]["per_class"]) == {"green", "red"}
    assert report["in_sample"]["greedy"]["per_class"]["red"]["n"] <= 12


def test_variants_are_reported_apart_from_the_headline(gated):
    root, gens, report = gated
    assert set(gens["variant"].fillna("")) == {"", "wording"}  # NaN: open-ended rows
    test_ids = {f"{c}-{i}" for c in ("green", "red") for i in range(12, 15)}
    per_class = report["unsteered"]["per_class"]
    assert per_class["green"]["n"] == per_class["red"]["n"] == 3  # the original wording only
    wording = report["variants"]["wording"]
    assert wording["unsteered"]["per_class"]["green"]["n"] == 3
    assert wording["controls"]["n"] == 3
    text = (Path(root) / "run" / "report.md").read_text()
    assert "## Headline" in text and "wording (test, never used to choose)" in text
    assert "Setting: two-way: a probe on the residual after layer 0" in text
    assert test_ids  # the ids the counts above refer to


def _run(root: Path, *extra: str) -> tuple[dict, dict]:
    overrides = [
        *planted_overrides(root, planted_dataset(root / "d.jsonl")),
        "directions.fit_split=train",
        "steer.layer=2",
        "steer.positions=last",
        "steer.n_random=1",
        "steer.confirm_n=0",
        "score.fluency.n_prompts=0",
        "report.plots=false",
        "pipeline.stages=[report]",
        *extra,
    ]
    cfg = compose_config(overrides)
    plant(cfg)
    run_experiment(cfg, root / "run")
    return (
        json.loads((root / "run" / "report.json").read_text()),
        json.loads((root / "run" / "artifacts" / "directions" / "directions.json").read_text()),
    )


def test_attention_output_with_the_answer_axis_and_its_gate(tmp_path):
    report, directions = _run(
        tmp_path,
        "directions.kind=attn_out",
        "directions.method=unembed",
        "directions.gate={measured: last, layer: 1, method: unembed}",
    )
    assert directions["kind"] == "attn_out" and directions["method"] == "unembed"
    assert directions["gate"]["method"] == "unembed"
    assert report["steer"]["site"] == "attn_out" and report["steer"]["gate"]["layer"] == 1
    assert report["gate"]["all"]["rate"] == 1.0  # the planted class is on the answer axis


def test_heads_kept_per_layer(tmp_path):
    report, directions = _run(tmp_path, "directions.kind=heads", "directions.heads=2")
    kept = directions["heads"]["2"]
    assert len(kept) == 2 and report["steer"]["heads"]["2"] == kept


def test_a_lens_gate_leaves_what_it_reads_as_neither_class_unsteered(tmp_path):
    report, directions = _run(
        tmp_path, "steer/mode=add", "directions.gate={measured: last, layer: 1, method: lens}"
    )
    assert directions["gate"]["method"] == "lens"
    gens = pd.read_parquet(tmp_path / "run" / "artifacts" / "steer" / "generations.parquet")
    controls = gens[gens["condition"] == "control"]
    assert (controls["side"] == "other").all()  # the planted controls' word is no swap word
    assert report["gate"]["all"]["rate"] == 1.0
