"""Issue 4 maths on synthetic data with known answers: transfer, folded weights, cosines,
paired contamination differences; and the prompt variants / reply rendering."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest

from mlx_interp.analysis.probes import (
    LogisticProbe,
    ProbeError,
    linear_weights,
    mean_diff_cosines,
    transfer_cv,
)
from mlx_interp.engine.schema import ConceptConfig, ProbesConfig, PromptsConfig, VariantsConfig
from mlx_interp.io.activations import resolve_probe_layers
from mlx_interp.io.datasets import DatasetError
from mlx_interp.stages.contamination import (
    ContaminationError,
    differences,
    paired_cosines,
    summarize,
)
from mlx_interp.stages.probes import contrasts_from_config


def _cluster(rng, center, n, d=12, noise=0.3):
    return center + noise * rng.normal(size=(n, d))


def test_transfer_flags_the_condition_that_shares_the_cue_and_not_the_one_that_does_not():
    # pressure = emotion cue (axis 0) + pressure cue (axis 1); the probe is trained on
    # pressure vs neutral, where both cues co-occur. A condition with only axis 0 large looks
    # like pressure to a probe that leans on axis 0, so make axis 0 the stronger cue.
    rng = np.random.default_rng(0)
    d = 12
    e0, e1 = np.eye(d)[0], np.eye(d)[1]
    x = {
        "pressure": _cluster(rng, 3 * e0 + 0.3 * e1, 30),
        "neutral": _cluster(rng, 0 * e0, 30),
        "emotion_only": _cluster(rng, 3 * e0, 30),
        "pressure_only": _cluster(rng, 0.3 * e1, 30),
    }
    results, model = transfer_cv(
        x,
        ["pressure"],
        ["neutral"],
        ["pressure", "neutral", "emotion_only", "pressure_only"],
        k=5,
        seed=0,
    )
    rate = {r.condition: r.fraction for r in results}
    assert rate["pressure"] > 0.9 and rate["neutral"] < 0.1  # held-out CV rates
    assert rate["emotion_only"] > 0.9  # the confound: fires without pressure
    assert rate["pressure_only"] < 0.1  # and not on pressure without the cue
    assert [r.in_training for r in results] == [True, True, False, False]
    assert all(r.n == 30 for r in results)


def test_transfer_scores_training_rows_by_cross_validation_not_by_the_fitted_probe():
    # Pure noise: a probe fitted on all rows memorizes them (training accuracy ~1 in d >> n),
    # but cross-validated predictions are at chance, which is what transfer must report.
    rng = np.random.default_rng(1)
    x = {"a": rng.normal(size=(20, 200)), "b": rng.normal(size=(20, 200))}
    results, model = transfer_cv(x, ["a"], ["b"], ["a", "b"], k=5, seed=0)
    fitted = model.predict(np.concatenate([x["a"], x["b"]]))
    assert fitted[:20].mean() == 1.0 and fitted[20:].mean() == 0.0  # memorized
    assert 0.15 < results[0].fraction < 0.85  # but the held-out rate is not


def test_transfer_errors_name_the_problem():
    x = {"a": np.ones((3, 4)), "b": np.zeros((10, 4))}
    with pytest.raises(ProbeError, match="fewer than the 5 CV folds"):
        transfer_cv(x, ["a"], ["b"], ["a"], k=5)
    with pytest.raises(ProbeError, match="no activations for condition"):
        transfer_cv(x, ["a"], ["b"], ["zzz"], k=2)
    with pytest.raises(ProbeError, match="both sides"):
        transfer_cv(x, ["a"], ["a"], ["a"], k=2)


def test_linear_weights_fold_the_scaler_into_raw_space_probabilities():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=5.0, scale=[1, 10, 0.1, 3], size=(60, 4))
    y = x[:, 0] + 0.1 * x[:, 1] > 6
    model = LogisticProbe(C=0.5).make(0).fit(x, y)
    coef, intercept = linear_weights(model)
    p = 1 / (1 + np.exp(-(x @ coef + intercept)))
    np.testing.assert_allclose(p, model.predict_proba(x)[:, 1], rtol=1e-9, atol=1e-12)


def test_mean_diff_cosines_recovers_a_planted_angle_and_covers_it():
    rng = np.random.default_rng(3)
    d = 64
    u = np.eye(d)[0]
    v = np.cos(np.pi / 3) * np.eye(d)[0] + np.sin(np.pi / 3) * np.eye(d)[1]  # cos = 0.5
    x = {
        "neutral": _cluster(rng, np.zeros(d), 200, d, 0.5),
        "A": _cluster(rng, 4 * u, 200, d, 0.5),
        "B": _cluster(rng, 4 * v, 200, d, 0.5),
    }
    (row,) = mean_diff_cosines(
        x, {"A-n": ("A", "neutral"), "B-n": ("B", "neutral")}, n_bootstrap=300, seed=0
    )
    assert row["a"] == "A-n" and row["b"] == "B-n"
    assert abs(row["cosine"] - 0.5) < 0.05
    assert row["lo"] < 0.5 < row["hi"]
    assert row["split_half_a"] > 0.95  # strong directions are reliable across halves


def test_mean_diff_cosines_of_orthogonal_noise_directions_is_near_zero():
    rng = np.random.default_rng(4)
    d = 256
    x = {c: rng.normal(size=(100, d)) for c in ("n", "a", "b")}
    x["a"][:, 0] += 3
    x["b"][:, 1] += 3
    (row,) = mean_diff_cosines(x, {"a": ("a", "n"), "b": ("b", "n")}, n_bootstrap=200)
    # both share the neutral mean's noise, which alone gives a positive cosine; with strong
    # signals on orthogonal axes it stays small
    assert abs(row["cosine"]) < 0.35
    with pytest.raises(ProbeError, match="at least two"):
        mean_diff_cosines(x, {"a": ("a", "n")})


def test_contrasts_from_config_pairs_named_and_multiclass():
    conds = ["SyA", "GA", "SyPr", "neutral"]
    out = contrasts_from_config(ProbesConfig(pairs="all", multiclass=["SyA", "GA", "SyPr"]), conds)
    assert len([n for n, s in out.items() if s["kind"] == "pair"]) == 6
    assert out["SyA_vs_GA"] == {"pos": ["SyA"], "neg": ["GA"], "kind": "pair"}
    assert out["multiclass"]["classes"] == ["SyA", "GA", "SyPr"]
    out = contrasts_from_config(
        ProbesConfig(pairs=[], contrasts={"p": {"pos": "SyA", "neg": ["GA"]}}), conds
    )
    assert out == {"p": {"pos": ["SyA"], "neg": ["GA"], "kind": "contrast"}}
    with pytest.raises(ProbeError, match="not in the prompts"):
        contrasts_from_config(ProbesConfig(pairs=[["SyA", "zzz"]]), conds)


def test_resolve_probe_layers():
    assert resolve_probe_layers(None, [0, 1, 2]) == [0, 1, 2]
    assert resolve_probe_layers([-1, 0], [0, 1, 2]) == [0, 2]
    with pytest.raises(ProbeError, match="not captured"):
        resolve_probe_layers([5], [0, 1, 2])


def _variant_prompts(n_base=12, domains=("x", "y")):
    rows = []
    for d in domains:
        for i in range(n_base):
            for v in ("clean", "rubric", "padding"):
                rows.append(
                    {
                        "prompt_id": f"{d}{i}|{v}",
                        "condition": d,
                        "variant": v,
                        "base_id": f"{d}{i}",
                        "n_tokens": 10,
                    }
                )
    return pd.DataFrame(rows)


def test_contamination_paired_differences_detect_a_planted_shift_and_not_a_null_one():
    rng = np.random.default_rng(5)
    prompts = _variant_prompts()
    d = 32
    x = np.empty((len(prompts), d))
    for i, r in enumerate(prompts.itertuples()):
        base = np.random.default_rng(zlib.crc32(r.base_id.encode())).normal(size=d) + 4
        shift = {"clean": 0.0, "rubric": 1.5, "padding": 0.3}[r.variant]
        x[i] = base + shift * rng.normal(size=d)
    cos = paired_cosines(prompts, {3: x}, "clean")
    assert set(cos["variant"]) == {"rubric", "padding"} and len(cos) == 48
    table = summarize(cos, 500, 0.95, 0)
    pooled = table[table["domain"] == "all"].set_index("variant")
    assert pooled.loc["rubric", "cosine"] < pooled.loc["padding", "cosine"]
    assert (
        pooled.loc["rubric", "lo"] <= pooled.loc["rubric", "cosine"] <= pooled.loc["rubric", "hi"]
    )
    diffs = differences(cos, [["rubric", "padding"], ["padding", "padding"]], 500, 0.95, 0)
    all_rp = diffs[(diffs["a"] == "rubric") & (diffs["domain"] == "all")].iloc[0]
    assert all_rp["diff"] < 0 and all_rp["significant"]
    null = diffs[(diffs["a"] == "padding") & (diffs["domain"] == "all")].iloc[0]
    assert null["diff"] == 0 and not null["significant"]
    with pytest.raises(ContaminationError, match="not among the prompts' variants"):
        differences(cos, [["rubric", "wrong_rubric"]], 10, 0.95, 0)


def test_contamination_needs_the_reference_variant():
    prompts = _variant_prompts()
    prompts = prompts[prompts["variant"] != "clean"]
    with pytest.raises(ContaminationError, match="no 'clean' variant"):
        paired_cosines(prompts, {0: np.ones((len(prompts), 4))}, "clean")


class _WordTokenizer:
    """Whitespace tokenizer with a chat template, enough for the prompt builder."""

    def encode(self, text, add_special_tokens=True):
        return [len(w) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        out = "".join(f"<{m['role']}> {m['content']} </end> " for m in messages)
        return out + ("<assistant> " if add_generation_prompt else "")


def _rows(tmp_path, with_reply=True):
    from mlx_interp.io.datasets import read_jsonl

    rows = [
        {
            "id": f"{c}-{i}",
            "text": f"task {c} number {i}",
            "condition": c,
            **({"response": f"reply {i} ends here."} if with_reply else {}),
        }
        for c in ("a", "b")
        for i in range(3)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return read_jsonl(path), path


def test_reply_is_rendered_as_the_assistant_turn_and_the_text_ends_with_it(tmp_path):
    from mlx_interp.stages.prompts import build_prompts

    df, path = _rows(tmp_path)
    concept = ConceptConfig(
        dataset=str(path), conditions=None, instruction="{text}", response_key="response"
    )
    table = build_prompts(
        df, concept, PromptsConfig(format="chat", test_fraction=0.0), _WordTokenizer(), 0
    )
    first = table.iloc[0]
    assert first["chat_text"] == "<user> task a number 0 </end> <assistant> reply 0 ends here."
    assert (table["variant"] == "").all() and (table["base_id"] == table["prompt_id"]).all()
    df2, _ = _rows(tmp_path, with_reply=False)
    with pytest.raises(DatasetError, match="has no 'response' string"):
        build_prompts(
            df2, concept, PromptsConfig(format="chat", test_fraction=0.0), _WordTokenizer(), 0
        )


def test_variants_add_own_wrong_rubric_and_equal_length_padding(tmp_path):
    from mlx_interp.stages.prompts import build_prompts

    df, path = _rows(tmp_path, with_reply=False)
    rubrics = tmp_path / "r.json"
    rubrics.write_text(
        json.dumps(
            {
                "a": "grade A answers strictly on clarity and depth",
                "b": "grade B answers for brevity only",
            }
        )
    )
    concept = ConceptConfig(
        dataset=str(path),
        conditions=None,
        instruction="{text}",
        variants=VariantsConfig(
            rubrics=str(rubrics), kinds=["clean", "rubric", "padding", "wrong_rubric"]
        ),
    )
    plain = PromptsConfig(format="plain", test_fraction=0.0)
    tok = _WordTokenizer()
    table = build_prompts(df, concept, plain, tok, 7)
    assert len(table) == 6 * 4
    one = table[table["base_id"] == "a-0"].set_index("variant")["text"]
    assert one["clean"] == "task a number 0"
    assert one["rubric"] == "grade A answers strictly on clarity and depth\n\ntask a number 0"
    assert one["wrong_rubric"].startswith("grade B answers")  # the next domain's rubric
    pad = one["padding"].split("\n\n")[0]
    assert len(tok.encode(pad)) == len(tok.encode("grade A answers strictly on clarity and depth"))
    assert "grade" not in pad
    again = build_prompts(df, concept, plain, tok, 7)
    pd.testing.assert_frame_equal(table.drop(columns="tokens"), again.drop(columns="tokens"))
    rubrics.write_text(json.dumps({"a": "only one"}))
    with pytest.raises(DatasetError, match=r"no rubric for condition\(s\) \['b'\]"):
        build_prompts(df, concept, plain, tok, 7)
