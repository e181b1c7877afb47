"""Tests for mlx_interp.interventions.sites: capture and steering at attn, mlp and per-head sites.

Every site is checked against the layer's pieces run by hand on tiny models of each
architecture tests/tiny_models.py builds.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_interp.interventions.capture import LayerIndexError, capture_batch
from mlx_interp.interventions.sites import (
    Site,
    SiteEdit,
    SiteError,
    capture_sites,
    capture_sites_batch,
    head_shape,
    parse_site,
    resolve_sites,
    steer_sites,
)
from mlx_interp.interventions.steering import AddMode, LayerEdit, SteeringError, steer
from tests.tiny_models import _embed, _layer_masks, embed_and_run_layers, tiny_model

TOKENS = [[5, 9, 17, 3, 44, 2, 99, 12, 7]]  # longer than gemma3_text's sliding window (4)
SHORT = [11, 4, 60]
LONG = [11, 4, 60, 23, 8, 101, 77, 5]
TOL = {"rtol": 1e-5, "atol": 1e-5}
POST_NORM = ("gemma2", "gemma3_text", "olmo2")  # a norm sits between block output and residual


def _layer_input(model, arch, tokens, layer):
    """Residual stream entering decoder ``layer`` and that layer's mask."""
    h = _embed(model, arch, tokens)
    mask = _layer_masks(model, arch, h)[layer]
    if layer > 0:
        h = embed_and_run_layers(model, arch, tokens, layer - 1)
    return h, mask


def _hand_layer(layer, arch, x, mask, mlp_delta=None):
    """Run one decoder layer piece by piece: its attn output, mlp output and residual output."""
    if arch == "gpt2":
        attn = layer.attn(layer.ln_1(x), mask, None)
        h = x + attn
        mlp = layer.mlp(layer.ln_2(h))
    elif arch == "olmo2":
        attn = layer.self_attn(x, mask, None)
        h = x + layer.post_attention_layernorm(attn)
        mlp = layer.mlp(h)
    else:
        attn = layer.self_attn(layer.input_layernorm(x), mask, None)
        h = x + (layer.post_attention_layernorm(attn) if arch in POST_NORM else attn)
        norm = (
            layer.pre_feedforward_layernorm if arch in POST_NORM else layer.post_attention_layernorm
        )
        mlp = layer.mlp(norm(h))
    if mlp_delta is not None:
        mlp = mlp + mlp_delta
    out = h + (layer.post_feedforward_layernorm(mlp) if arch in POST_NORM else mlp)
    return {"attn": attn, "mlp": mlp, "resid": out}


def _out_proj(model, layer):
    """The attention output projection of ``layer`` (gpt2: attn.c_proj, others: o_proj)."""
    block = model.layers[layer]
    return block.attn.c_proj if "attn" in block else block.self_attn.o_proj


def _project(model, layer, heads):
    """Heads ``[..., n_heads, head_dim]`` through the layer's output projection by hand."""
    proj = _out_proj(model, layer)
    out = heads.reshape(*heads.shape[:-2], -1) @ proj.weight.T
    return out + proj.bias if "bias" in proj else out


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("layers.8", Site(8, "resid")),
        ("layers.8.mlp", Site(8, "mlp")),
        ("layers.8.attn", Site(8, "attn")),
        ("layers.8.self_attn", Site(8, "attn")),
        ("layers.-1.self_attn.heads", Site(-1, "heads")),
        ("model.layers.3.attn.heads", Site(3, "heads")),
        ("blocks.8.hook_resid_post", Site(8, "resid")),
        ("blocks.-2.hook_attn_out", Site(-2, "attn")),
        ("blocks.0.hook_mlp_out", Site(0, "mlp")),
        ("blocks.5.attn.hook_z", Site(5, "heads")),
        (("resid_post", 8), Site(8, "resid")),
        (("mlp_out", -1), Site(-1, "mlp")),
        (("attn_out", 2), Site(2, "attn")),
        (("z", 3), Site(3, "heads")),
        ("blocks.5.hook_resid_pre", Site(5, "resid_pre")),
        ("blocks.5.hook_resid_mid", Site(5, "resid_mid")),
        ("blocks.5.attn.hook_pattern", Site(5, "pattern")),
        ("blocks.5.attn.hook_attn_scores", Site(5, "attn_scores")),
        ("blocks.5.attn.hook_q", Site(5, "q")),
        ("blocks.5.attn.hook_rot_k", Site(5, "k")),
        ("blocks.5.attn.hook_v", Site(5, "v")),
        ("blocks.5.mlp.hook_pre", Site(5, "mlp_pre")),
        ("blocks.5.mlp.hook_pre_linear", Site(5, "mlp_pre_linear")),
        ("blocks.5.mlp.hook_post", Site(5, "mlp_post")),
        ("hook_embed", Site(0, "embed")),
        ("embed", Site(0, "embed")),
        ("logits", Site(-1, "logits")),
        ("layers.5.attn.pattern", Site(5, "pattern")),
        ("layers.5.self_attn.q", Site(5, "q")),
        ("layers.5.mlp.post", Site(5, "mlp_post")),
        ("layers.5.resid_post", Site(5, "resid_post")),
        (("pattern", 5), Site(5, "pattern")),
        (("post", 5), Site(5, "mlp_post")),
        (("pre", -1), Site(-1, "mlp_pre")),
    ],
)
def test_parse_site(name, expected):
    site = parse_site(name)
    assert site == expected
    assert parse_site(site.name) == site


@pytest.mark.parametrize(
    "name",
    [
        "layer.1",
        "layers.x.mlp",
        "layers.1.mlp.heads",
        "layers.1.foo",
        "layers",
        "",
        "blocks.1.hook_resid_foo",  # (hook_resid_pre is a site now)
        "blocks.1.attn.hook_nope",
        "layers.1.attn.pattern.x",
        ("resid", 8),
        ("mlp_out", "8"),
        ("mlp_out", True),
    ],
)
def test_bad_site_names_raise_a_clear_error(name):
    with pytest.raises(SiteError, match="layers.8.mlp"):
        parse_site(name)


def test_bad_site_types_and_kinds():
    with pytest.raises(SiteError, match="a site is a name"):
        parse_site(8)
    with pytest.raises(SiteError, match="valid: resid, attn, mlp, heads"):
        Site(1, "ffn")


def test_out_of_range_layer_and_empty_selection():
    model = tiny_model("llama")
    with pytest.raises(LayerIndexError, match="out of range"):
        resolve_sites(model, ["layers.3.mlp"])
    with pytest.raises(SiteError, match="no sites selected"):
        resolve_sites(model, [])
    assert resolve_sites(model, ["layers.-1.mlp", "layers.2.mlp"]) == [Site(2, "mlp")]


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Linear(4, 4)
        self.ffn = nn.Linear(4, 4)

    def __call__(self, x, mask=None, cache=None):
        return x + self.ffn(self.mixer(x))


class _OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [_OddBlock()]

    def __call__(self, x):
        return self.layers[0](x)


@pytest.mark.parametrize("name", ["layers.0.mlp", "layers.0.attn", "layers.0.attn.heads"])
def test_unsupported_architecture_names_what_exists(name):
    model = _OddModel()
    with pytest.raises(SiteError, match="its children are: ffn, mixer"):
        resolve_sites(model, [name])
    with capture_sites(model, ["layers.0"]) as rec:  # the residual stream still works
        model(mx.ones((1, 2, 4)))
    assert rec.outputs["layers.0"].shape == (1, 2, 4)
    assert type(model.layers[0]) is _OddBlock


# --- capture against a hand-computed forward -----------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_sites_match_the_hand_computed_layer(arch_model, layer):
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    names = [f"layers.{layer}{s}" for s in ("", ".attn", ".mlp", ".attn.heads")]
    with capture_sites(model, names) as rec:
        model(tokens)
    x, mask = _layer_input(model, arch, tokens, layer)
    hand = _hand_layer(model.layers[layer], arch, x, mask)
    for kind in ("attn", "mlp", "resid"):
        captured = rec.outputs[Site(layer, kind).name]
        np.testing.assert_array_equal(np.array(captured), np.array(hand[kind]), err_msg=kind)
    heads = rec.outputs[f"layers.{layer}.attn.heads"]
    assert heads.shape == (1, len(TOKENS[0]), *head_shape(model, layer))
    projected = _project(model, layer, heads)
    np.testing.assert_allclose(np.array(projected), np.array(hand["attn"]), **TOL)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_heads_match_hand_written_attention(arch):
    """Per-head outputs equal softmax(q k^T * scale + causal) v, computed from the weights."""
    model = tiny_model(arch)
    tokens = mx.array(TOKENS)
    with capture_sites(model, ["layers.1.attn.heads"]) as rec:
        model(tokens)
    x, _ = _layer_input(model, arch, tokens, 1)
    attention = model.layers[1].self_attn
    xn = model.layers[1].input_layernorm(x)
    n_heads, n_kv = attention.n_heads, attention.n_kv_heads
    seq = x.shape[1]

    def split(proj, count):
        return proj(xn).reshape(1, seq, count, -1).transpose(0, 2, 1, 3)

    queries = attention.rope(split(attention.q_proj, n_heads))
    keys = mx.repeat(attention.rope(split(attention.k_proj, n_kv)), n_heads // n_kv, axis=1)
    values = mx.repeat(split(attention.v_proj, n_kv), n_heads // n_kv, axis=1)
    scores = (queries @ keys.transpose(0, 1, 3, 2)) * attention.scale
    causal = mx.triu(mx.full((seq, seq), -mx.inf), k=1)
    expected = (mx.softmax(scores + causal, axis=-1) @ values).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.array(rec.outputs["layers.1.attn.heads"]), expected, **TOL)


def test_classes_restored_and_logits_bit_identical(arch_model):
    _, model = arch_model
    tokens = mx.array(TOKENS)
    sites = [Site(i, kind) for i in range(len(model.layers)) for kind in ("resid", "attn", "mlp")]
    sites += [Site(1, "heads")]
    modules = lambda: [type(m) for _, m in model.named_modules()]  # noqa: E731
    before_classes, before = modules(), np.array(model(tokens))
    with capture_sites(model, sites) as rec:
        assert modules() != before_classes
        inside = np.array(model(tokens))
    assert len(rec.outputs) == len(sites)
    assert modules() == before_classes
    np.testing.assert_array_equal(inside, before)
    np.testing.assert_array_equal(np.array(model(tokens)), before)
    with pytest.raises(RuntimeError, match="boom"), capture_sites(model, sites):
        raise RuntimeError("boom")
    assert modules() == before_classes


@pytest.mark.parametrize("positions", ["last", "mean", "all"])
def test_batch_residual_site_equals_capture_batch_exactly(arch_model, positions):
    _, model = arch_model
    ours = capture_sites_batch(model, [SHORT, LONG], ["layers.0", "layers.-1"], positions)
    theirs = capture_batch(model, [SHORT, LONG], [0, -1], positions)
    last = len(model.layers) - 1
    assert sorted(ours) == ["layers.0", f"layers.{last}"]
    for index in (0, last):
        a, b = ours[f"layers.{index}"], theirs[index]
        for x, y in zip(a, b, strict=True) if positions == "all" else [(a, b)]:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("positions", ["last", "mean", "all"])
def test_padding_does_not_change_site_vectors(arch_model, positions):
    _, model = arch_model
    names = ["layers.1.attn", "layers.1.mlp", "layers.0.attn.heads"]
    batched = capture_sites_batch(model, [SHORT, LONG], names, positions, pad_id=0)
    for row, seq in enumerate([SHORT, LONG]):
        alone = capture_sites_batch(model, [seq], names, positions)
        for name in names:
            np.testing.assert_allclose(batched[name][row], alone[name][0], err_msg=name, **TOL)
    assert batched["layers.0.attn.heads"][0].shape[-2:] == head_shape(model, 0)


def test_batch_all_matches_last_and_mean_for_heads():
    model = tiny_model("qwen3")
    name = "layers.2.attn.heads"
    all_ = capture_sites_batch(model, [SHORT, LONG], [name], "all")[name]
    last = capture_sites_batch(model, [SHORT, LONG], [name], "last")[name]
    mean = capture_sites_batch(model, [SHORT, LONG], [name], "mean")[name]
    for row, seq in enumerate([SHORT, LONG]):
        assert all_[row].shape == (len(seq), *head_shape(model, 2))
        np.testing.assert_allclose(all_[row][-1], last[row], **TOL)
        np.testing.assert_allclose(all_[row].mean(axis=0), mean[row], **TOL)


def test_stop_after_last_skips_later_layers_without_changing_values():
    model = tiny_model("llama")
    tokens = mx.array(TOKENS)
    with capture_sites(model, ["layers.1.mlp", "layers.2"]) as full:
        model(tokens)
    with capture_sites(model, ["layers.0", "layers.1"], stop_after_last=True) as both:
        assert both.run(model, tokens) is None
    np.testing.assert_array_equal(
        np.array(both.outputs["layers.1"]), embed_and_run_layers(model, "llama", tokens, 1)
    )
    with capture_sites(model, ["layers.1.mlp", "layers.2.attn"]) as later:
        with capture_sites(model, ["layers.1.mlp"], stop_after_last=True) as rec:
            assert rec.run(model, tokens) is None
    assert "layers.2.attn" not in later.outputs  # layer 2 never ran
    np.testing.assert_array_equal(
        np.array(rec.outputs["layers.1.mlp"]), np.array(full.outputs["layers.1.mlp"])
    )


# --- steering ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_mlp_steering_equals_adding_to_the_mlp_output_by_hand(arch_model, alpha):
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    x, mask = _layer_input(model, arch, tokens, 1)
    vector = _rand(x.shape[-1], 1)
    edits = [SiteEdit("layers.1.mlp", vector)]
    with steer_sites(model, edits, "add", alpha):
        with capture_sites(model, ["layers.1.mlp", "layers.1", "layers.2"]) as rec:
            steered_logits = np.array(model(tokens))
    hand = _hand_layer(model.layers[1], arch, x, mask, mlp_delta=alpha * mx.array(vector))
    np.testing.assert_array_equal(np.array(rec.outputs["layers.1.mlp"]), np.array(hand["mlp"]))
    np.testing.assert_array_equal(np.array(rec.outputs["layers.1"]), np.array(hand["resid"]))
    after = model.layers[2](hand["resid"], _layer_masks(model, arch, x)[2], None)
    np.testing.assert_allclose(np.array(rec.outputs["layers.2"]), np.array(after), **TOL)
    plain = np.array(model(tokens))
    assert not np.allclose(steered_logits, plain)
    if arch not in POST_NORM:  # the mlp output is added straight to the residual stream
        with steer(model, [LayerEdit(1, vector)], "add", alpha):
            residual_steered = np.array(model(tokens))
        np.testing.assert_allclose(steered_logits, residual_steered, **TOL)


def test_steer_sites_honours_every_layer_and_for_layer_like_steer(arch_model):
    """ablate_all (every_layer) at a residual site equals steer(); for_layer binds per layer."""
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    x, _ = _layer_input(model, arch, tokens, 1)
    vector = _rand(x.shape[-1], 2)
    with steer(model, [LayerEdit(1, vector)], "ablate_all", 1.0):
        by_layer = np.array(model(tokens))
    with steer_sites(model, [SiteEdit("layers.1", vector)], "ablate_all", 1.0):
        by_site = np.array(model(tokens))
    np.testing.assert_array_equal(by_site, by_layer)
    with steer_sites(model, [SiteEdit("layers.1", vector)], "ablate", 1.0):
        one_layer = np.array(model(tokens))
    assert not np.allclose(one_layer, by_site)

    bound = []

    class Binding(AddMode):
        def for_layer(self, layer):
            bound.append(layer)
            return self

    with steer_sites(model, [SiteEdit("layers.2.mlp", vector)], Binding(), 1.0):
        model(tokens)
    assert bound == [2]


def test_heads_steering_moves_attn_output_by_the_projected_vector(arch_model):
    _, model = arch_model
    tokens = mx.array(TOKENS)
    n_heads, head_dim = head_shape(model, 0)
    vector = _rand((n_heads, head_dim), 2)
    with capture_sites(model, ["layers.0.attn"]) as plain:
        model(tokens)
    with steer_sites(model, [SiteEdit("layers.0.attn.heads", vector)], "add", 2.0):
        with capture_sites(model, ["layers.0.attn"]) as steered:
            model(tokens)
    moved = mx.array(vector).reshape(-1) @ _out_proj(model, 0).weight.T  # linear part only
    expected = plain.outputs["layers.0.attn"] + 2.0 * moved
    np.testing.assert_allclose(np.array(steered.outputs["layers.0.attn"]), expected, **TOL)


def test_attn_reflect_steering_and_restore(arch_model):
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    x, mask = _layer_input(model, arch, tokens, 2)
    vector, center = _rand(x.shape[-1], 3), _rand(x.shape[-1], 4)
    classes = [type(m) for _, m in model.named_modules()]
    plain = np.array(model(tokens))
    with steer_sites(model, [SiteEdit("layers.-1.self_attn", vector, center)], "reflect", 1.0):
        with capture_sites(model, ["layers.2.attn"]) as rec:
            steered = np.array(model(tokens))
    raw = _hand_layer(model.layers[2], arch, x, mask)["attn"]
    u = mx.array(vector / np.linalg.norm(vector))
    expected = raw - (2.0 * ((raw - mx.array(center)) @ u))[..., None] * u
    np.testing.assert_allclose(np.array(rec.outputs["layers.2.attn"]), expected, **TOL)
    assert not np.allclose(steered, plain)
    assert [type(m) for _, m in model.named_modules()] == classes
    np.testing.assert_array_equal(np.array(model(tokens)), plain)


def test_alpha_zero_is_bit_identical():
    model = tiny_model("qwen2")
    tokens = mx.array(TOKENS)
    plain = np.array(model(tokens))
    edits = [SiteEdit("layers.1.mlp", _rand(32, 5)), SiteEdit("layers.0.attn.heads", _rand(32, 6))]
    with steer_sites(model, edits, "add", 0.0):
        np.testing.assert_array_equal(np.array(model(tokens)), plain)


def test_steering_holds_in_cached_generation():
    """Prefill plus one cached step gives the same logits as a full steered forward."""
    model = tiny_model("llama")
    tokens = TOKENS[0]
    edits = [SiteEdit("layers.1.mlp", _rand(32, 7)), SiteEdit("layers.2.attn.heads", _rand(32, 8))]
    with steer_sites(model, edits, "add", 1.5):
        full = np.array(model(mx.array([tokens]))[0, -1])
        cache = make_prompt_cache(model)
        model(mx.array([tokens[:-1]]), cache=cache)
        stepped = np.array(model(mx.array([tokens[-1:]]), cache=cache)[0, -1])
    np.testing.assert_allclose(stepped, full, **TOL)
    assert not np.allclose(full, np.array(model(mx.array([tokens]))[0, -1]))


@pytest.mark.parametrize(
    ("edits", "mode", "alpha", "match"),
    [
        ([SiteEdit("layers.1.mlp", np.ones(5))], "add", 1.0, r"\(32,\) \(d_model\)"),
        ([SiteEdit("layers.1.attn.heads", np.ones((2, 16)))], "add", 1.0, r"\(4, 8\) \(n_heads"),
        ([SiteEdit("layers.1.mlp", np.zeros(32))], "add", 1.0, "all zeros"),
        ([SiteEdit("layers.1.mlp", np.full(32, np.nan))], "add", 1.0, "NaN"),
        ([SiteEdit("layers.1.mlp", np.ones(32))], "reflect", 1.0, "needs a center"),
        ([SiteEdit("layers.1.mlp", np.ones(32))], "add", float("inf"), "finite"),
        ([SiteEdit("layers.1.mlp", np.ones(32))], "nope", 1.0, "unknown steering mode"),
        ([LayerEdit(1, np.ones(32))], "add", 1.0, "not a SiteEdit"),
    ],
)
def test_invalid_steering_requests_fail_before_touching_the_model(edits, mode, alpha, match):
    model = tiny_model("llama")
    classes = [type(m) for _, m in model.named_modules()]
    with pytest.raises(SteeringError, match=match), steer_sites(model, edits, mode, alpha):
        pass
    assert [type(m) for _, m in model.named_modules()] == classes


def test_width_checked_in_the_forward_when_the_model_declares_none():
    model = _OddModel()
    with steer_sites(model, [SiteEdit("layers.0", np.ones(3))], "add", 1.0):
        with pytest.raises(SteeringError, match="width 4 but the steering vector has 3"):
            model(mx.ones((1, 2, 4)))
    assert type(model.layers[0]) is _OddBlock


def test_steering_bad_site_raises_site_error():
    model = tiny_model("llama")
    with pytest.raises(SiteError, match="cannot parse site"):
        with steer_sites(model, [SiteEdit("layers.1.ffn", np.ones(32))], "add", 1.0):
            pass


# --- the real embedded model (quantized output projection) ----------------------------------

N_GEN = 8


def _greedy(model, prompt, n, cached):
    """Greedy ids: mlx-lm's generate loop with its KV cache, or a full recompute per token."""
    if cached:
        from mlx_lm.generate import generate_step

        steps = generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=n)
        return [int(token) for token, _ in steps]
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1]).item()))
    return tokens[len(prompt) :]


@pytest.mark.slow
def test_smollm2_quantized_heads_and_mlp_steering(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("My favourite animal is the")
    middle = len(model.layers) // 2
    names = [f"layers.{middle}.attn", f"layers.{middle}.attn.heads", f"layers.{middle}.mlp"]
    with capture_sites(model, names) as rec:
        model(mx.array([prompt]))
    proj = model.layers[middle].self_attn.o_proj
    assert isinstance(proj, nn.QuantizedLinear)
    weight = mx.dequantize(proj.weight, proj.scales, proj.biases, proj.group_size, proj.bits)
    heads = rec.outputs[names[1]].astype(mx.float32)
    projected = heads.reshape(*heads.shape[:-2], -1) @ weight.astype(mx.float32).T
    attn = np.array(rec.outputs[names[0]].astype(mx.float32))
    np.testing.assert_allclose(np.array(projected), attn, rtol=1e-3, atol=1e-3 * np.abs(attn).max())

    happy, sad = tokenizer.encode(" happy")[0], tokenizer.encode(" sad")[0]
    embeddings = np.array(model.model.embed_tokens(mx.array([happy, sad])).astype(mx.float32))
    direction = embeddings[0] - embeddings[1]
    mlp_norm = float(np.median(np.linalg.norm(np.array(rec.outputs[names[2]][0]), axis=-1)))
    edits = [SiteEdit(names[2], direction / np.linalg.norm(direction) * mlp_norm)]
    with steer_sites(model, edits, "add", 4.0):
        cached = _greedy(model, prompt, N_GEN, cached=True)
        uncached = _greedy(model, prompt, len(cached), cached=False)
    assert cached == uncached and len(cached) == N_GEN
    assert cached != _greedy(model, prompt, N_GEN, cached=True)
