"""Steering quality: fluency rows in the steer stage, the fluency report, the sweep summary's
swap-vs-loop columns and plot, and the steer_quality experiment's configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlx_interp.analysis.fluency import FluencySpec, fluency
from mlx_interp.analysis.scoring import ScoringError
from mlx_interp.apps.cli import run_experiment
from mlx_interp.apps.sweep import write_summary
from mlx_interp.engine.schema import FluencyConfig, ScoreConfig
from mlx_interp.interventions.modes import mode_name
from mlx_interp.interventions.steering import (
    ConditionalMode,
    NormPreservingMode,
    ReflectMode,
    make_mode,
)
from mlx_interp.stages.report import compute_report, fluency_report
from mlx_interp.stages.report_text import render_markdown
from mlx_interp.stages.steer import add_fluency, fluency_prompts, fluency_spec
from tests.helpers import compose_config, write_dataset

SWAP = {"green": "red", "red": "green"}
LOOP = [7, 8, 9] * 5  # ends in five copies of a 3-token cycle
FINE = list(range(10, 25))
FLUENCY = {
    "n_prompts": 4,
    "max_tokens": 16,
    "instruction": "{text} Tell me more.",
    "ngram": 3,
    "max_period": 10,
    "min_repeats": 3,
}


def _score(fluency: dict) -> ScoreConfig:
    return ScoreConfig(fluency=FluencyConfig(**fluency))


class ChatStub:
    """Tokenizer stub: the chat template wraps the user text; encode maps chars to ids."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<u>" + messages[-1]["content"] + "<a>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text]


# --- stage helpers ----------------------------------------------------------------------


def test_fluency_prompts_cover_every_class_and_use_the_instruction():
    swap = pd.DataFrame(
        {
            "prompt_id": [f"g{i}" for i in range(6)] + [f"r{i}" for i in range(6)],
            "condition": ["green"] * 6 + ["red"] * 6,
            "text": [f"Q{i}?" for i in range(12)],
        }
    )
    picked = fluency_prompts(swap, _score(FLUENCY), ChatStub())
    assert len(picked) == 4 and set(picked["condition"]) == {"green", "red"}
    assert picked["prompt_id"].iloc[0] == "g0" and picked["prompt_id"].iloc[-1] == "r5"
    first = ChatStub().encode("<u>Q0? Tell me more.<a>")
    assert list(picked["tokens"].iloc[0]) == first
    assert fluency_prompts(swap, _score({**FLUENCY, "n_prompts": 0}), ChatStub()).empty
    assert len(fluency_prompts(swap, _score({**FLUENCY, "n_prompts": 50}), ChatStub())) == 12
    with pytest.raises(ScoringError, match="has no \\{text\\}"):
        fluency_prompts(swap, _score({**FLUENCY, "instruction": "Hi"}), ChatStub())
    with pytest.raises(ScoringError, match="n_prompts must be >= 0"):
        fluency_prompts(swap, _score({**FLUENCY, "n_prompts": -1}), ChatStub())
    with pytest.raises(ScoringError, match="score.fluency: fluency min_repeats"):
        fluency_spec(_score({**FLUENCY, "min_repeats": 1}))


def test_add_fluency_scores_generated_rows_only():
    table = pd.DataFrame(
        {
            "scorer": ["logit", "generate", "fluency"],
            "token_ids": [None, FINE, LOOP],
        }
    )
    out = add_fluency(table, FluencySpec())
    assert out["n_tokens"].isna().iloc[0] and pd.isna(out["loop"].iloc[0])
    assert not out["loop"].iloc[1] and out["loop"].iloc[2]
    assert out["loop_period"].iloc[2] == 3
    assert out["repeated_ngram_share"].iloc[2] == pytest.approx(fluency(LOOP).repeated_ngram_share)


# --- report -----------------------------------------------------------------------------


def _tables(steered_loops: int, unsteered_loops: int, n: int = 6):
    """Baseline/generations with logit rows for every question and n long answers per side;
    the first `*_loops` long answers loop; every steered long answer names red."""
    base, gens = [], []
    for c, cond in enumerate(("green", "red")):
        for i in range(n):
            pid = f"{cond}-{i}"
            row = {"prompt_id": pid, "condition": cond, "top_token": "x", "top_word": None}
            base.append({**row, "scorer": "logit", "margin": -1.0})
            base.append({**row, "scorer": "generate", "answer": cond, "named": cond})
            gens.append(
                {**row, "direction": "main", "scorer": "logit", "margin": 1.0, "swapped": c == 0}
            )
            gens.append({**row, "direction": "random-00", "scorer": "logit", "swapped": False})
    for i in range(n):
        cond = ("green", "red")[i % 2]
        pid = f"{cond}-{i}"
        gens.append(
            {
                "prompt_id": pid,
                "condition": cond,
                "direction": "main",
                "scorer": "fluency",
                "answer": f"steered {i}",
                "named": "red",
                "token_ids": LOOP if i < steered_loops else FINE,
                "swapped": cond == "green",
            }
        )
        base.append(
            {
                "prompt_id": pid,
                "condition": cond,
                "scorer": "fluency",
                "answer": f"plain {i}",
                "named": cond,
                "token_ids": LOOP if i < unsteered_loops else FINE,
            }
        )
    spec = FluencySpec()
    return add_fluency(pd.DataFrame(base), spec), add_fluency(pd.DataFrame(gens), spec)


DIRECTIONS = {
    "method": "mean_diff",
    "contrast": ["red", "green"],
    "n_pos": 6,
    "n_neg": 6,
    "per_layer": {},
}
CFG = {"swap": SWAP, "controls": ["control"], "model_name": "toy"}


def _steer_info(alpha=1.0, mode="ReflectMode"):
    return {
        "layers": [3],
        "alpha": alpha,
        "mode": mode,
        "n_random": 1,
        "scorer": "logit",
        "fluency": FLUENCY,
    }


def test_fluency_report_counts_loops_steered_and_unsteered():
    base, gens = _tables(steered_loops=4, unsteered_loops=1)
    fl = fluency_report(base, gens, SWAP)
    long = fl["long"]
    assert (long["steered"]["loop"]["k"], long["steered"]["loop"]["n"]) == (4, 6)
    assert (long["unsteered"]["loop"]["k"], long["unsteered"]["loop"]["n"]) == (1, 6)
    assert long["steered"]["names_target"]["k"] == 3  # the three green questions name red
    assert long["unsteered"]["names_target"]["k"] == 0
    expected = np.mean([fluency(LOOP).distinct_2] * 4 + [fluency(FINE).distinct_2] * 2)
    assert long["steered"]["distinct_2"] == pytest.approx(expected)
    assert "short" not in fl  # no steered short answers in these tables
    report = compute_report(base, gens, DIRECTIONS, _steer_info(), CFG)
    assert report["fluency"] == fl
    md = render_markdown(report)
    assert "## Fluency" in md and "long answers, steered | 6 | 4/6" in md
    assert "loop rate of open-ended answers, steered (unsteered) | 4/6" in md
    no_random = gens[~gens["direction"].str.startswith("random")]
    md = render_markdown(compute_report(base, no_random, DIRECTIONS, _steer_info(), CFG))
    assert "none run (steer.n_random=0)" in md and "nan" not in md


def test_sweep_summary_gets_loop_columns_and_the_swap_vs_loop_plot(tmp_path):
    for job, (alpha, loops) in enumerate([(1.0, 0), (2.0, 2), (4.0, 5)]):
        base, gens = _tables(steered_loops=loops, unsteered_loops=1)
        info = _steer_info(alpha, mode_name(NormPreservingMode("reflect")))
        report = compute_report(base, gens, DIRECTIONS, info, CFG)
        folder = tmp_path / str(job)
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(report, default=float))
    table = write_summary(tmp_path)
    assert table["loop_rate"].tolist() == pytest.approx([0, 2 / 6, 5 / 6])
    assert table["loop_rate_unsteered"].tolist() == pytest.approx([1 / 6] * 3)
    assert set(table["mode"]) == {"NormPreservingMode(ReflectMode)"}
    assert (tmp_path / "swap_vs_loop.png").stat().st_size > 5000
    assert "loop_rate" in (tmp_path / "summary.md").read_text()


# --- configs ----------------------------------------------------------------------------


MODE_FILES = sorted(
    p.stem for p in (Path(__file__).parents[2] / "conf" / "steer" / "mode").glob("*.yaml")
)


@pytest.mark.parametrize("mode", MODE_FILES)
def test_every_steer_mode_config_composes_and_builds(mode, tmp_path):
    from safetensors.numpy import save_file

    probe = tmp_path / "probes.safetensors"
    save_file(
        {"c/8/coef": np.ones(4, np.float32), "c/8/intercept": np.zeros(1, np.float32)},
        str(probe),
    )
    overrides = [f"steer/mode={mode}"]
    if mode == "conditional":
        overrides.append(f"steer.mode.probe_path={probe}")
    cfg = compose_config(overrides)
    built = make_mode(cfg.steer.mode)
    assert callable(built)
    if mode == "conditional":
        assert isinstance(built, ConditionalMode) and isinstance(built.inner, ReflectMode)
        assert built.for_layer(8).coef.shape == (4,)


def test_steer_quality_experiment_composes_with_its_sweep():
    cfg = compose_config(["experiment=steer_quality"])
    default = compose_config([])  # the model/concept's steered layer, not one of its own
    assert cfg.steer.layer == default.steer.layer and cfg.score.fluency.n_prompts > 0
    params = cfg.hydra.sweeper.params if "hydra" in cfg else None
    if params is not None:  # compose() without a multirun may drop the hydra node
        assert set(params) == {"steer/mode", "steer.alpha"}
    legacy = compose_config(["steer.mode=add"])  # a plain name still works
    assert make_mode(legacy.steer.mode).__class__.__name__ == "AddMode"


# --- the DAG on the tiny model ----------------------------------------------------------


def test_steer_stage_records_fluency_for_every_generation(tmp_path):
    dataset = write_dataset(tmp_path / "d.jsonl", 6, ("green", "red", "control"))
    overrides = [
        "model=tiny_random",
        f"concept.dataset={dataset}",
        "concept.fewshot=[]",
        f"paths.outputs={tmp_path / 'outputs'}",
        "steer.layer=2",
        "steer.n_random=1",
        "steer.confirm_n=3",
        "steer/mode=reflect_norm",
        "score.fluency.n_prompts=3",
        "score.fluency.max_tokens=10",
    ]
    results = run_experiment(compose_config(overrides), tmp_path / "run")
    gens = pd.read_parquet(Path(results["steer"]["path"]) / "generations.parquet")
    base = pd.read_parquet(Path(results["baseline"]["path"]) / "baseline.parquet")
    for table in (gens, base):
        generated = table[table["scorer"] != "logit"]
        assert generated["loop"].notna().all() and generated["n_tokens"].le(12).all()
        for _, row in generated.iterrows():
            assert bool(row["loop"]) == fluency(list(row["token_ids"])).loop
    assert (gens["scorer"] == "fluency").sum() == 3 and (base["scorer"] == "fluency").sum() == 3
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    long = report["fluency"]["long"]["steered"]
    loops = gens[(gens["scorer"] == "fluency")]["loop"].astype(bool).sum()
    assert long["loop"]["k"] == loops and long["n"] == 3
    assert report["steer"]["mode"] == "NormPreservingMode(ReflectMode)"
    assert results["report"]["summary"]["loop_rate"] == pytest.approx(loops / 3)
