"""The issue-4 experiments end to end on the tiny random model: probes, transfer, cosines,
rubric contamination, their reports, plots and exported probe weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from mlx_interp.analysis.probes import ProbeError
from mlx_interp.apps.cli import run_experiment
from tests.helpers import compose_config


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _sycophancy(tmp_path: Path, n: int = 6) -> Path:
    rows = []
    for cond in ("SyA", "GA", "SyPr", "neutral"):
        for i in range(n):
            rows.append(
                {
                    "id": f"{cond}-{i}",
                    "condition": cond,
                    "text": f"{cond} claim {i} " + "really " * (i % 3),
                    "response": f"{cond} reply number {i}.",
                }
            )
    return _write(tmp_path / "syc.jsonl", rows)


def _common(tmp_path: Path) -> list[str]:
    return [
        "model=tiny_random",
        f"paths.outputs={tmp_path / 'outputs'}",
        "probes.n_permutations=3",
        "probes.folds=3",
        "probes.n_bootstrap=40",
    ]


def test_sycophancy_3way_runs_and_reports(tmp_path):
    cfg = compose_config(
        [
            "experiment=sycophancy_3way",
            f"concept.dataset={_sycophancy(tmp_path)}",
            *_common(tmp_path),
        ]
    )
    out = run_experiment(cfg, tmp_path / "run")
    assert set(out) == {"prompts", "capture", "probes", "probe_report"}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    n_layers = cfg.model.tiny.num_layers
    assert report["layers"] == list(range(n_layers))
    assert len(report["contrasts"]) == 7  # 6 pairs + the 3-way probe
    for c in report["contrasts"].values():
        assert 0 <= c["accuracy_mean"] <= 1 and len(c["per_layer"]) == n_layers
        assert 0 < c["permutation_p"] <= 1
    assert report["contrasts"]["multiclass"]["n"] == 18
    cos = report["cosines"]
    assert set(cos) == {
        "SyA-neutral~GA-neutral",
        "SyA-neutral~SyPr-neutral",
        "GA-neutral~SyPr-neutral",
    }
    for c in cos.values():
        for v in c["per_layer"].values():
            assert -1 <= v["ci95"][0] <= v["ci95"][1] <= 1
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.startswith("# Probes") and "0.61 (mid-to-late layers)" in md
    for png in ("probe_accuracy.png", "cosines.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    weights = load_file(str(Path(out["probes"]["path"]) / "probes.safetensors"))
    assert weights["SyA_vs_GA/0/coef"].shape == (cfg.model.tiny.hidden_size,)
    assert weights["SyA_vs_GA/0/intercept"].shape == (1,)
    assert not any(k.startswith("multiclass/") for k in weights)
    # the prompts end with the reply (no end-of-turn token after it)
    prompts = pd.read_parquet(Path(out["prompts"]["path"]) / "prompts.parquet")
    assert all(
        t.endswith(f"reply number {i}.")
        for t, i in zip(
            prompts["chat_text"], [int(p.split("-")[1]) for p in prompts["prompt_id"]], strict=True
        )
    )
    # same config, same numbers: fully cached and identical on a re-run
    again = run_experiment(cfg, tmp_path / "run2")
    assert all(r["cached"] for r in again.values())


def test_confound_transfer_table_and_training_rows_by_cv(tmp_path):
    conds = [
        "direct_pressure",
        "neutral_question",
        "third_party_emotion",
        "clinical_pressure",
        "irrelevant_emotion",
        "bare_question",
        "SyA",
        "GA",
    ]
    rows = [
        {"id": f"{c}-{i}", "condition": c, "text": f"{c.replace('_', ' ')} question {i}?"}
        for c in conds
        for i in range(6)
    ]
    data = _write(tmp_path / "confound.jsonl", rows)
    cfg = compose_config(
        [
            "experiment=sycophancy_confound",
            f"concept.dataset={data}",
            "concept.extra_datasets=[]",
            *_common(tmp_path),
        ]
    )
    out = run_experiment(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["contrasts"]) == {"pressure", "sya_vs_ga"}
    t = report["transfer"]["pressure"]
    assert list(t["conditions"]) == conds
    assert t["conditions"]["direct_pressure"]["in_training"]
    assert not t["conditions"]["clinical_pressure"]["in_training"]
    assert all(c["n"] == 6 for c in t["conditions"].values())
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| direct_pressure (training) |" in md and "| 92% |" in md
    table = pd.read_parquet(Path(out["probes"]["path"]) / "transfer.parquet")
    assert len(table) == 2 * len(conds) * cfg.model.tiny.num_layers
    assert (tmp_path / "run" / "transfer.png").stat().st_size > 1000


def test_a_class_with_fewer_examples_than_folds_is_a_clear_error(tmp_path):
    cfg = compose_config(
        [
            "experiment=sycophancy_3way",
            f"concept.dataset={_sycophancy(tmp_path, n=2)}",
            *_common(tmp_path),
        ]
    )
    with pytest.raises(ProbeError, match="fewer than the 3 CV folds"):
        run_experiment(cfg, tmp_path / "run")
    # the prompts and capture computed before the failure are kept
    arts = tmp_path / "outputs" / "artifacts"
    assert len(list((arts / "capture").glob("*/_manifest.json"))) == 1


def test_rubric_contamination_runs_and_reports(tmp_path):
    domains = ["alpha_domain", "beta_domain", "gamma_domain"]
    rows = [
        {"id": f"{d}-{i}", "condition": d, "text": f"Please help with {d} task {i}."}
        for d in domains
        for i in range(5)
    ]
    data = _write(tmp_path / "tasks.jsonl", rows)
    rubrics = tmp_path / "rubrics.json"
    rubrics.write_text(
        json.dumps(
            {
                d: f"Answers about {d} are graded on accuracy, clarity and "
                "the use of evidence, each scored from one to five."
                for d in domains
            }
        )
    )
    cfg = compose_config(
        [
            "experiment=rubric_contamination",
            f"concept.dataset={data}",
            f"concept.conditions=[{','.join(domains)}]",
            f"concept.variants.rubrics={rubrics}",
            "contamination.n_bootstrap=50",
            *_common(tmp_path),
        ]
    )
    out = run_experiment(cfg, tmp_path / "run")
    assert set(out) == {"prompts", "capture", "contamination", "contamination_report"}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n_base_prompts"] == 15
    for d in [*domains, "all"]:
        for v in ("rubric", "padding", "wrong_rubric"):
            c = report["cells"][f"{d}|{v}"]
            assert c["ci95"][0] <= c["cosine"] <= c["ci95"][1] + 1e-12
            assert -1 <= c["cosine"] <= 1
    assert {(d["a"], d["b"]) for d in report["differences"]} == {
        ("rubric", "padding"),
        ("rubric", "wrong_rubric"),
    }
    tokens = report["mean_tokens_per_variant"]
    assert abs(tokens["rubric"] - tokens["padding"]) <= 2  # equal-length padding
    assert (tmp_path / "run" / "contamination.png").stat().st_size > 1000
    cos = pd.read_parquet(Path(out["contamination"]["path"]) / "cosines.parquet")
    assert np.isfinite(cos["cosine"]).all()


def test_the_probes_stage_file_drives_conditional_steering_with_the_fitted_probability(tmp_path):
    """The probes.safetensors contract: load_probe reads the stage's file, and
    sigmoid(h @ coef + intercept) equals the fitted probe's predict_proba on the same states;
    a steer run with steer/mode=conditional on that file completes."""
    from mlx_interp.analysis.probes import LogisticProbe
    from mlx_interp.interventions.modes import load_probe
    from mlx_interp.io.activations import activation_matrix, read_activations
    from tests.helpers import write_dataset

    data = write_dataset(tmp_path / "c.jsonl", n_per_class=6, conditions=("green", "red"))
    base = [
        "model=tiny_random",
        f"concept.dataset={data}",
        "concept.fewshot=[]",
        "concept.conditions=[green,red]",
        "score.controls=[]",
        f"paths.outputs={tmp_path / 'outputs'}",
        "probes.pairs=[[green,red]]",
        "probes.n_permutations=0",
        "probes.folds=3",
        "steer.layer=2",
    ]
    out = run_experiment(compose_config([*base, "pipeline.stages=[probes]"]), tmp_path / "p")
    path = Path(out["probes"]["path"]) / "probes.safetensors"
    coef, intercept = load_probe(path, "green_vs_red", 2)
    prompts = pd.read_parquet(Path(out["prompts"]["path"]) / "prompts.parquet")
    x = activation_matrix(
        read_activations(Path(out["capture"]["path"]), [2]), prompts["prompt_id"].tolist()
    )[2]
    y = (prompts["condition"] == "green").to_numpy()
    fitted = LogisticProbe().make(42).fit(x, y)
    p = 1 / (1 + np.exp(-(x.astype(np.float64) @ coef + intercept)))
    np.testing.assert_allclose(p, fitted.predict_proba(x)[:, 1], atol=2e-4)
    steered = run_experiment(
        compose_config(
            [
                *base,
                "steer/mode=conditional",
                f"steer.mode.probe_path={path}",
                "steer.mode.contrast=green_vs_red",
                "steer.n_random=1",
                "steer.confirm_n=2",
                "score.fluency.n_prompts=1",
            ]
        ),
        tmp_path / "s",
    )
    assert "steer" in steered and "report" in steered
