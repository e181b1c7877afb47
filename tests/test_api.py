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


# --- run_with_cache, to_str_tokens, edit -----------------------------------------------------


def test_run_with_cache_equals_one_forward_per_prompt(model):
    prompts = ["Grass is", "A fire truck is painted bright"]
    logits, cache = model.run_with_cache(prompts, sites=["resid_post", "pattern"], layers=[1])
    assert isinstance(logits, mx.array) and isinstance(cache["resid_post", 1], mx.array)
    lengths = [len(model.tokens(p)) for p in prompts]
    assert cache.lengths == lengths and logits.shape[:2] == (2, max(lengths))
    for row, prompt in enumerate(prompts):
        alone_logits, alone = model.run_with_cache(
            prompt, sites=["resid_post", "pattern"], layers=[1]
        )
        n = lengths[row]
        np.testing.assert_allclose(np.array(logits[row, :n]), np.array(alone_logits[0]), atol=1e-4)
        np.testing.assert_allclose(
            np.array(cache["blocks.1.hook_resid_post"][row, :n]),
            np.array(alone["resid_post", 1][0]),
            atol=1e-5,
        )
        pattern = np.array(cache["pattern", 1][row])  # [heads, query, key]
        np.testing.assert_allclose(pattern[:, :n, :n], np.array(alone["pattern", 1][0]), atol=1e-5)
    short = lengths[0]
    assert np.isnan(np.array(cache["resid_post", 1][0, short:])).all()  # pads are NaN
    assert np.isnan(np.array(logits[0, short:])).all()
    assert not np.isnan(np.array(cache["resid_post", 1][1])).any()


def test_run_with_cache_positions_stack_numpy_and_every_site(model):
    _, cache = model.run_with_cache(["Grass is", "Snow is white"], positions="last", as_numpy=True)
    n = model.n_layers
    assert isinstance(cache["resid_post", 0], np.ndarray)
    assert cache.stack("resid_post").shape == (n, 2, model.d_model)
    assert cache.stack("pattern").shape[:3] == (n, 2, model.anatomy.n_heads)
    assert cache["embed"].shape == (2, model.d_model) and cache["logits"].shape[0] == 2
    assert cache.stack("k", layers=[0, -1]).shape == (2, 2, model.anatomy.n_kv_heads, 8)
    full_logits, full = model.run_with_cache(["Grass is", "Snow is white"], sites="resid_mid")
    rows = [len(model.tokens(p)) - 1 for p in ["Grass is", "Snow is white"]]
    np.testing.assert_allclose(
        cache["resid_mid", 2], np.array(full["resid_mid", 2])[[0, 1], rows], atol=1e-6
    )
    _, picked = model.run_with_cache(["Grass is", "Snow is white"], "mlp_post", [0], [0, -1])
    assert picked["mlp_post", 0].shape == (2, 2, model.anatomy.d_mlp)
    np.testing.assert_allclose(
        np.array(picked["mlp_post", 0][:, 1]), cache["mlp_post", 0], atol=1e-6
    )
    with pytest.raises(KeyError, match="no z values"):
        full.stack("z")


def test_to_str_tokens_and_token_prompts(model):
    pieces = model.to_str_tokens("Grass is green")
    ids = model.tokens("Grass is green")
    assert len(pieces) == len(ids) and "".join(pieces).endswith("Grass is green")
    assert model.to_str_tokens(ids) == pieces
    assert model.to_str_tokens(["Grass", "Snow is"]) == [
        model.to_str_tokens("Grass"),
        model.to_str_tokens("Snow is"),
    ]
    logits, _ = model.run_with_cache(ids, sites="resid_post", layers=[0])
    np.testing.assert_array_equal(np.array(logits[0]), np.array(model.model(mx.array([ids]))[0]))


def test_edit_functions_and_modes_on_the_public_face(model):
    d = mi.Direction.train(model, PROMPTS[:2], PROMPTS[2:], layers=[1])
    _, plain = model.run_with_cache("Grass is", sites="resid_post", layers=[1])
    with model.edit({"blocks.1.hook_resid_post": lambda h: h * 0}, positions="last"):
        _, zeroed = model.run_with_cache("Grass is", sites="resid_post", layers=[1])
    got = np.array(zeroed["resid_post", 1][0])
    assert np.abs(got[-1]).max() == 0 and np.array_equal(
        got[:-1], np.array(plain["resid_post", 1][0])[:-1]
    )
    with model.edit({("resid_post", 1): d.vectors[1]}, mode="add", alpha=2.0):
        _, added = model.run_with_cache("Grass is", sites="resid_post", layers=[1])
    np.testing.assert_allclose(
        np.array(added["resid_post", 1][0]),
        np.array(plain["resid_post", 1][0]) + 2.0 * d.vectors[1],
        atol=1e-5,
    )
    with pytest.raises(ConfigError, match="run_with_cache"):
        model.record("Grass is", sites="pattern")
    rec = model.record(["Grass is", "Snow"], sites=["mlp_post", "resid_pre", "q"], layers=[0])
    assert rec["mlp_post", 0].shape == (2, model.anatomy.d_mlp)
    assert rec["q", 0].shape == (2, model.anatomy.n_heads, model.anatomy.head_dim)


def test_the_library_pages_task_blocks_run(model):
    """Every ```python block of docs/library.md after the first (which loads SmolLM2), in
    order, on the tiny random model."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "library.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert len(blocks) >= 6
    namespace = {"mi": mi, "model": model}
    for block in blocks[1:]:
        exec(compile(block, str(page), "exec"), namespace)
    assert namespace["cache"].stack("resid_post").shape[0] == 1
    np.testing.assert_allclose(
        np.array(namespace["logits"][0, -1]),
        np.array(model.model(mx.array([model.tokens("Grass is")]))[0, -1]),
        atol=1e-4,
    )


def test_generate_under_a_positioned_edit_edits_the_prompts_last_token(model):
    """mlx-lm's generate runs the prompt in two forwards; -1 is still its last token."""
    tokens = model.tokens("Grass is")
    edit = {("resid_post", 1): lambda h: h[..., ::-1] * 20.0}  # reversed and scaled
    with model.edit(edit, positions="last"):
        text = model.generate("Grass is", max_tokens=4, chat=False)
    seq = list(tokens)
    with model.edit(edit, positions=len(tokens) - 1):
        for _ in range(4):
            seq.append(int(mx.argmax(model.model(mx.array([seq]))[0, -1]).item()))
    assert text.strip() == model.tokenizer.decode(seq[len(tokens) :]).strip()
    assert text != model.generate("Grass is", max_tokens=4, chat=False)
