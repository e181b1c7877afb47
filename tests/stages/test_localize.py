"""Positions, readouts, logit lens and patching on tiny random models against hand
computations (full forwards without caches, masks written out by hand)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pandas as pd
import pytest

from mlx_interp.analysis.lens import lens_logit_diff, unembed
from mlx_interp.analysis.scoring import LogitScorer, Steering
from mlx_interp.interventions.capture import capture_layers
from mlx_interp.interventions.patching import PATCH_ROLES, PatchingError, patching_recovery
from mlx_interp.interventions.positions import (
    PositionError,
    object_span,
    position_mask,
    role_positions,
)
from mlx_interp.interventions.readout import residuals_at
from mlx_interp.interventions.steering import LayerEdit, ReflectMode, steer
from tests.tiny_models import tiny_model

PREFIX = [5, 17, 9, 33, 2, 8, 41, 7, 19, 23]
SEQS = [PREFIX + [50, 51, 52, 3], PREFIX + [60, 61, 4], PREFIX + [70, 71, 72, 73, 74, 6]]
SPANS = [(11, 13), (10, 11), (12, 15)]


class CharTokenizer:
    """One character per token id (ord), so spans can be checked by eye."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_object_span_finds_the_last_occurrence_and_names_a_missing_object():
    tok = CharTokenizer()
    ids = tok.encode("Q: grass? A: x. Q: What colour is Grass? A:")
    start, end = object_span(tok, ids, "grass")
    assert tok.decode(ids[start:end]) == "Grass"
    with pytest.raises(PositionError, match="does not occur"):
        object_span(tok, ids, "blood")


def test_position_masks_by_hand():
    last = position_mask("last", [5, 3], 2, None)
    assert last.tolist() == [[False, False, True], [True, False, False]]
    obj = position_mask("object", [5, 3], 2, [(2, 4), (2, 3)])
    assert obj.tolist() == [[True, True, False], [True, False, False]]
    with pytest.raises(PositionError, match="inside the"):
        position_mask("object", [5], 2, [(1, 3)])
    assert role_positions((2, 4), 7) == {"object": [2, 3], "after": [4, 5], "last": [6]}


class _MaskedReflect:
    """Reference: reflect at fixed positions of a single unbatched, uncached forward."""

    needs_center = True

    def __init__(self, positions):
        self.positions = positions

    def __call__(self, h, vector, center, alpha):
        mask = np.zeros(h.shape[1], bool)
        mask[self.positions] = True
        return mx.where(mx.array(mask)[None, :, None], ReflectMode()(h, vector, center, alpha), h)


class _WordTok:
    def encode(self, text, add_special_tokens=False):
        return [{"a": 1, "b": 2}.get(text.strip().lower(), 3)]

    def decode(self, ids):
        return " ".join(map(str, ids))


class _LM:
    def __init__(self, model):
        self.model, self.tokenizer = model, _WordTok()


@pytest.mark.parametrize("rule", ["object", "last"])
def test_per_row_positions_equal_single_prompt_masked_forwards(rule):
    model = tiny_model("llama", seed=3)
    d = model.args.hidden_size
    rng = np.random.default_rng(0)
    edit = LayerEdit(1, rng.standard_normal(d).astype(np.float32) * 3, np.zeros(d, np.float32))
    steering = Steering((edit,), ReflectMode(), 1.0, rule)
    got = LogitScorer(batch_size=2)(
        _LM(model), SEQS, ["a"] * 3, ["b"] * 3, ["a", "b"], steering, spans=SPANS
    )
    for seq, span, row in zip(SEQS, SPANS, got, strict=True):
        where = list(range(*span)) if rule == "object" else [len(seq) - 1]
        with steer(model, [edit], _MaskedReflect(where), 1.0):
            logits = np.array(model(mx.array([seq]))[0, -1].astype(mx.float32))
        assert row["margin"] == pytest.approx(float(logits[2] - logits[1]), abs=1e-4)
    unsteered = LogitScorer(batch_size=2)(_LM(model), SEQS, ["a"] * 3, ["b"] * 3, ["a", "b"])
    assert not np.allclose([r["margin"] for r in got], [r["margin"] for r in unsteered])


def test_residuals_at_equal_the_captured_span_mean():
    model = tiny_model("qwen2", seed=2)
    got = residuals_at(model, SEQS, SPANS, [0, 2])
    for i, (seq, (s, e)) in enumerate(zip(SEQS, SPANS, strict=True)):
        with capture_layers(model, [0, 2]) as rec:
            model(mx.array([seq]))
        for layer in (0, 2):
            want = np.array(rec.outputs[layer][0, s:e].astype(mx.float32)).mean(0)
            np.testing.assert_allclose(got[layer][i], want, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_lens_at_the_last_layer_equals_the_model_logits(arch):
    model = tiny_model(arch, seed=4)
    diff = lens_logit_diff(model, SEQS, SPANS, [[1, 2]] * 3, [[3]] * 3)
    assert diff.shape == (3, len(model.layers), 3)
    for i, seq in enumerate(SEQS):
        logits = np.array(model(mx.array([seq]))[0].astype(mx.float32))  # [seq, vocab]
        want = logits[-1, [1, 2]].max() - logits[-1, 3]
        assert diff[i, -1, 2] == pytest.approx(float(want), abs=1e-4)
        want_obj = logits[SPANS[i][1] - 1, [1, 2]].max() - logits[SPANS[i][1] - 1, 3]
        assert diff[i, -1, 0] == pytest.approx(float(want_obj), abs=1e-4)
        # an earlier layer through the same head: computed by hand from the captured residual
        with capture_layers(model, [0]) as rec:
            model(mx.array([seq]))
        early = np.array(unembed(model, rec.outputs[0][0, -1]).astype(mx.float32))
        assert diff[i, 0, 2] == pytest.approx(float(early[[1, 2]].max() - early[3]), abs=1e-4)


def test_patching_every_position_recovers_all_and_late_object_patches_nothing():
    model = tiny_model("llama", seed=5)
    clean = [PREFIX + [50, 51, 52, 3], PREFIX + [60, 61, 62, 4]]
    corrupt = [PREFIX + [90, 91, 52, 3], PREFIX + [95, 96, 62, 4]]
    spans = [(10, 12), (10, 12)]
    res = patching_recovery(model, clean, corrupt, spans, [[1]] * 2, [[2]] * 2)
    rec = res["recovery"]
    assert rec.shape == (len(model.layers), len(PATCH_ROLES))
    np.testing.assert_allclose(rec[:, PATCH_ROLES.index("all")], 1.0, atol=1e-3)
    # after the last layer the object's residual can no longer reach the last token
    assert rec[-1, PATCH_ROLES.index("object")] == pytest.approx(0.0, abs=1e-4)
    # the last token's residual after the last layer is what the head reads
    assert rec[-1, PATCH_ROLES.index("last")] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(PatchingError, match="equal token count"):
        patching_recovery(model, [clean[0]], [corrupt[0] + [7]], spans[:1], [[1]], [[2]])


def test_localization_report_end_to_end_on_the_tiny_model(tmp_path):
    import json

    from mlx_interp.apps.cli import run_experiment
    from tests.helpers import compose_config

    rows = []
    for cond, objects in (("green", ["cat", "dog", "sun"]), ("red", ["car", "box", "hat"])):
        for obj in objects:
            for template in ("What colour is the {}?", "Which colour is a {} today?"):
                rows.append(
                    {
                        "id": f"{cond}-{obj}-{len(rows)}",
                        "text": template.format(obj),
                        "condition": cond,
                        "object": obj,
                    }
                )
    rows.append(
        {"id": "control-0", "text": "What is the sky?", "condition": "control", "object": "sky"}
    )
    rows.append(
        {"id": "control-1", "text": "What is the sea?", "condition": "control", "object": "sea"}
    )
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = compose_config(
        [
            "model=tiny_random",
            f"concept.dataset={dataset}",
            "concept.fewshot=[]",
            f"paths.outputs={tmp_path / 'outputs'}",
            "steer.layer=2",
            "steer.positions=object",
            "directions.site=object",
            "steer.n_random=2",
            "steer.confirm_n=2",
            "pipeline.stages=[localization_report]",
            "localize.kinds=[resid,attn,mlp]",
        ]
    )
    results = run_experiment(cfg, tmp_path / "run")
    assert {"logit_lens", "patching", "report", "localization_report"} <= set(results)
    loc = json.loads((tmp_path / "run" / "localization.json").read_text())
    assert loc["localization"]["patching"]["n_pairs"] >= 2
    assert (tmp_path / "run" / "patching.png").stat().st_size > 1000
    assert "Where the colour is decided" in (tmp_path / "run" / "localization.md").read_text()
    patching = pd.read_parquet(Path(results["patching"]["path"]) / "patching.parquet")
    np.testing.assert_allclose(patching[patching["role"] == "all"]["recovery"], 1.0, atol=1e-3)
    assert set(patching["site"]) == {"resid", "attn", "mlp"}
    assert (tmp_path / "run" / "patching_mlp.png").stat().st_size > 1000
    assert set(loc["localization"]["patching"]["best_by_site"]) == {"resid", "attn", "mlp"}
    assert "best MLP output" in (tmp_path / "run" / "localization.md").read_text()
    meta = json.loads((Path(results["directions"]["path"]) / "directions.json").read_text())
    assert meta["site"] == "object" and "object's tokens" in meta["measured_at"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
def test_patching_attention_and_mlp_outputs(arch):
    """Sites inside a layer: the residual's numbers do not change when more kinds are asked;
    an attention or MLP output at the object's tokens of the last layer cannot reach the last
    token (recovers 0, like the residual there); at the last token they do move it."""
    model = tiny_model(arch, seed=5)
    clean = [PREFIX + [50, 51, 52, 3], PREFIX + [60, 61, 62, 4]]
    corrupt = [PREFIX + [90, 91, 52, 3], PREFIX + [95, 96, 62, 4]]
    spans = [(10, 12), (10, 12)]
    args = (model, clean, corrupt, spans, [[1]] * 2, [[2]] * 2)
    only = patching_recovery(*args)
    res = patching_recovery(*args, kinds=("resid", "attn", "mlp"))
    np.testing.assert_allclose(res["by_kind"]["resid"], only["recovery"], atol=1e-6)
    obj, last = PATCH_ROLES.index("object"), PATCH_ROLES.index("last")
    for kind in ("attn", "mlp"):
        rec = res["by_kind"][kind]
        assert rec.shape == (len(model.layers), len(PATCH_ROLES))
        assert rec[-1, obj] == pytest.approx(0.0, abs=1e-4)
        assert abs(rec[-1, last]) > 1e-3
    with pytest.raises(PatchingError, match="kinds"):
        patching_recovery(*args, kinds=("pattern",))


def test_patch_site_writes_the_values_where_the_mask_is_and_nothing_else():
    from mlx_interp.interventions.patching import patch_site
    from mlx_interp.interventions.sites import Site, capture_sites

    model = tiny_model("llama", seed=8)
    tokens = mx.array([SEQS[0][:12], SEQS[1][:12]])
    site = Site(1, "mlp")
    with capture_sites(model, [site]) as rec:
        plain_logits = model(tokens)
        own = rec.outputs[site.name]
    mask = np.zeros((2, 12), bool)
    mask[0, 3:5] = mask[1, 11] = True
    values = mx.array(np.random.default_rng(0).normal(size=own.shape).astype(np.float32))
    with patch_site(model, site, mx.array(mask), own):  # its own values: nothing changes
        np.testing.assert_allclose(np.array(model(tokens)), np.array(plain_logits), atol=1e-6)
    with patch_site(model, site, mx.array(mask), values):
        with capture_sites(model, [site]) as rec:
            model(tokens)
            got = np.array(rec.outputs[site.name])
    np.testing.assert_allclose(got[mask], np.array(values)[mask], atol=1e-6)
    np.testing.assert_allclose(got[~mask], np.array(own)[~mask], atol=1e-6)
    assert type(model.layers[1].mlp).__name__ == "MLP"  # restored
