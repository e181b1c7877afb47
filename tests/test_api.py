"""The public face (mlx_interp.load / Model.record / Direction.train / Direction.apply),
checked against the pipeline functions it holds together, on the tiny random model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_interp as mi
from mlx_interp.errors import ConfigError, MlxInterpError
from mlx_interp.interventions.capture import capture_batch
from mlx_interp.interventions.sites import SiteError
from mlx_interp.interventions.steering import LayerEdit, steer
from mlx_interp.models.loading import ModelLoadError, model_config, source_for_path

PROMPTS = ["Grass is", "A fire truck is painted", "The sky at noon", "Snow"]


@pytest.fixture
def model(tiny_lm):
    return tiny_lm


def test_public_names_are_few_and_lazy():
    assert sorted(mi.__all__) == ["ActivationCache", "Direction", "Model", "load"]
    with pytest.raises(AttributeError):
        mi.not_a_name  # noqa: B018


def test_record_equals_capture_batch_at_every_layer(model):
    cache = model.record(PROMPTS, sites="resid_post", layers=None)
    seqs = [model.tokens(p) for p in PROMPTS]
    for start in (0, 2):  # record batches by 16; capture_batch pads differently: same values
        ref = capture_batch(model.model, seqs[start : start + 2], None, "last", model.loaded.pad_id)
        for layer, values in ref.items():
            np.testing.assert_allclose(
                cache["resid_post", layer][start : start + 2], values, rtol=1e-5, atol=1e-5
            )
    assert len(cache) == model.n_layers


def test_cache_speaks_every_site_name(model):
    cache = model.record(PROMPTS[:2], sites=["resid_post", "mlp_out", "attn_out", "z"], layers=-1)
    last = model.n_layers - 1
    assert cache["resid_post", -1] is cache[f"layers.{last}"]
    assert cache["blocks.-1.hook_mlp_out"] is cache[f"layers.{last}.mlp"]
    assert cache["attn_out", last].shape == (2, model.d_model)
    assert cache["z", -1].shape[0] == 2 and cache["z", -1].ndim == 3
    with pytest.raises(KeyError, match="was not recorded") as missing:
        cache["resid_post", 0]
    assert isinstance(missing.value, MlxInterpError) and ("resid_post", 0) not in cache
    with pytest.raises(SiteError, match="out of range"):
        cache["resid_post", 99]


def test_record_all_positions_and_chat(model):
    cache = model.record("Grass is green", layers=[0], positions="all", chat=True)
    (rows,) = cache["resid_post", 0]
    assert rows.shape == (len(model.tokens("Grass is green", chat=True)), model.d_model)
    assert len(model.tokens("Grass is green", chat=True)) > len(model.tokens("Grass is green"))
    with pytest.raises(ConfigError, match="positions"):
        model.record("x", positions="first")
    with pytest.raises(ConfigError, match="non-empty"):
        model.record([" "])


def test_train_is_the_mean_difference_of_recorded_states(model):
    pos, neg = PROMPTS[:2], PROMPTS[2:]
    d = mi.Direction.train(model, pos, neg, layers=[1, -1])
    assert d.layers == [1, model.n_layers - 1]
    for layer in d.layers:
        a = model.record(pos, layers=[layer])["resid_post", layer].astype(np.float64)
        b = model.record(neg, layers=[layer])["resid_post", layer].astype(np.float64)
        np.testing.assert_allclose(d.vectors[layer], a.mean(0) - b.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d.center(layer), (a.mean(0) + b.mean(0)) / 2, atol=1e-6)
    assert isinstance(-d, mi.Direction) and isinstance(2 * d, mi.Direction)


def test_apply_equals_steer_and_restores_the_model(model):
    d = mi.Direction.train(model, PROMPTS[:2], PROMPTS[2:], layers=[1, 2])
    tokens = mx.array([model.tokens("Grass is")])
    before = np.array(model.model(tokens))
    with d.apply(model, alpha=3.0, mode="reflect", layers=[2]):
        applied = np.array(model.model(tokens))
    edits = [LayerEdit(2, d.vectors[2], d.center(2))]
    with steer(model.model, edits, "reflect", 3.0):
        by_hand = np.array(model.model(tokens))
    np.testing.assert_array_equal(applied, by_hand)
    assert not np.allclose(applied, before)
    np.testing.assert_array_equal(np.array(model.model(tokens)), before)
    with pytest.raises(ConfigError, match=r"no direction at layer\(s\) \[0\]"):
        with d.apply(model, layers=[0]):
            pass


def test_default_prompt_format_follows_the_model(model, monkeypatch):
    assert model.tokens("Grass is", chat=None) == model.tokens("Grass is", chat=True)
    monkeypatch.setattr(model.loaded, "prompt_format", "plain")  # a base model, e.g. Gemma
    assert model.tokens("Grass is", chat=None) == model.tokens("Grass is", chat=False)


def test_generate_steered_differs_and_files_round_trip(model, tmp_path):
    d = mi.Direction.train(model, PROMPTS[:2], PROMPTS[2:], layers=[1])
    plain = model.generate("Grass is", max_tokens=4, chat=False)
    with d.apply(model, alpha=8.0):
        steered = model.generate("Grass is", max_tokens=4, chat=False)
    assert plain != steered and model.generate("Grass is", max_tokens=4, chat=False) == plain
    d.save(tmp_path / "d.safetensors")
    back = mi.Direction.load(tmp_path / "d.safetensors")
    assert isinstance(back, mi.Direction) and back.meta["model"] == "tiny_random"
    np.testing.assert_array_equal(back.vectors[1], d.vectors[1])
    d.save_control_vector(tmp_path / "d.gguf", alpha=2.0)
    cv = mi.Direction.load_control_vector(tmp_path / "d.gguf")
    np.testing.assert_allclose(cv.vectors[1], d.vectors[1], rtol=1e-6)
    with pytest.raises(ConfigError, match="max_tokens"):
        model.generate("x", max_tokens=0)


def test_load_resolves_names_paths_and_refuses_the_rest(tmp_path):
    assert model_config("smollm2_135m")["source"] == "embedded"
    assert source_for_path("/models/x.gguf") == "gguf"
    assert source_for_path("mlx-community/Qwen2.5-7B-Instruct-4bit") == "mlx_lm"
    assert source_for_path(tmp_path) == "mlx_lm"
    cfg = model_config(str(tmp_path / "m.gguf"))
    assert (cfg["source"], cfg["name"]) == ("gguf", "m")
    (tmp_path / "notes.txt").write_text("x")
    for bad in ("no_such_model", str(tmp_path / "notes.txt")):
        with pytest.raises(ModelLoadError, match="gguf"):
            mi.load(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        mi.load(tmp_path / "missing.gguf")
