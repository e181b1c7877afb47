"""Every site of every tiny architecture against a forward written here by hand.

Attention is recomputed in numpy from the recorded block input with the model's own
projections, norms and rope, and each architecture's rules as mlx-lm's sources state them
(scale, gemma2's soft-capping, gemma3's 4-token window on its local layers, grouped-query
heads); the block's sums and the MLP's neurons from the modules. Then the identities:
pattern rows sum to 1, ``pattern @ v = z``, ``o_proj(z) = attn_out``, ``down(mlp_post) =
mlp_out``, ``resid_mid = resid_pre + attn_out`` (post-norm: ``+ post_attn_norm(attn_out)``),
``resid_post = resid_mid + mlp_out`` (post-norm: ``+ post_mlp_norm(mlp_out)``), and the last
layer's lens equals the logits. The real models run the same checks (slow).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_interp.interventions.sites import KINDS, capture_sites, edit_sites
from mlx_interp.models.anatomy import anatomy_of
from tests.tiny_models import _CONFIGS, ODD_ANATOMY, _embed, odd_model

TOKENS = mx.array([[5, 9, 17, 3, 44, 2, 99, 12, 7]])  # longer than gemma3's window (4)
TOL = {"rtol": 1e-4, "atol": 2e-5}
POST_NORM = ("gemma2", "gemma3_text", "olmo2")
EVERY_KIND = [k for k in KINDS if k not in ("embed", "logits")]


def _np(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _record_everything(model, tokens, kinds=EVERY_KIND):
    n = len(anatomy_of(model).layers)
    names = ["embed", "logits"] + [(k, i) for i in range(n) for k in kinds]
    gated_none = anatomy_of(model).layer(0).gated is False
    names = [s for s in names if not (gated_none and s[0] == "mlp_pre_linear")]
    with capture_sites(model, names) as rec:
        logits = model(tokens)
    return rec.outputs, logits


def _block(model, arch, i):
    return model.layers[i]


def _attn(model, arch, i):
    block = model.layers[i]
    return block.attn if arch == "gpt2" else block.self_attn


def _sizes(arch):
    cfg = _CONFIGS[arch]
    if arch == "gpt2":
        return cfg["n_head"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    heads = cfg["num_attention_heads"]
    return (
        heads,
        cfg.get("num_key_value_heads", heads),
        cfg.get("head_dim") or (cfg["hidden_size"] // heads),
    )


def hand_attention(model, arch, i, x):
    """q, k, v ``[b, s, heads, d]``, scores, pattern ``[b, heads, s, s]`` (masked scores
    -inf) and z ``[b, s, heads, d]`` of layer ``i`` from its input ``x``, written out."""
    block, attn = _block(model, arch, i), _attn(model, arch, i)
    n_heads, n_kv, d = _sizes(arch)
    h = {"gpt2": lambda: block.ln_1(x), "olmo2": lambda: x}.get(arch, lambda: None)()
    h = block.input_layernorm(x) if h is None else h
    b, s, _ = h.shape
    if arch == "phi3":
        q, k, v = mx.split(attn.qkv_proj(h), [n_heads * d, (n_heads + n_kv) * d], axis=-1)
    elif arch == "gpt2":
        q, k, v = mx.split(attn.c_attn(h), 3, axis=-1)
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    if arch == "olmo2":  # full-width q/k norms before the split
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.reshape(b, s, n_heads, d), k.reshape(b, s, n_kv, d), v.reshape(b, s, n_kv, d)
    if arch in ("qwen3", "gemma3_text"):  # per-head q/k norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    if arch != "gpt2":  # rope on [b, heads, s, d]
        q = attn.rope(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        k = attn.rope(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    q, k, v = _np(q), _np(k), _np(v)
    scale = _CONFIGS[arch].get("query_pre_attn_scalar", d) ** -0.5
    ke, ve = (np.repeat(a, n_heads // n_kv, axis=2) for a in (k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    if arch == "gemma2":
        scores = 50.0 * np.tanh(scores / 50.0)
    query, key = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = key <= query
    if arch == "gemma3_text" and i % 2 == 0:  # local layers: the last 4 tokens only
        allowed &= query - key < 4
    scores = np.where(allowed, scores, -np.inf)
    pattern = np.exp(scores - scores.max(-1, keepdims=True))
    pattern /= pattern.sum(-1, keepdims=True)
    z = np.einsum("bhqk,bkhd->bqhd", pattern, ve)
    return {
        "q": q,
        "k": k,
        "v": v,
        "scores": scores,
        "pattern": pattern,
        "z": z,
        "allowed": allowed,
    }


def _act(arch):
    return nn.gelu_approx if arch.startswith(("gemma", "gpt2")) else nn.silu


def hand_mlp(model, arch, i, resid_mid):
    """The MLP's pre-activation, up projection (gated) and neurons from ``resid_mid``."""
    block = model.layers[i]
    if arch == "gpt2":
        pre = block.mlp.c_fc(block.ln_2(resid_mid))
        return pre, None, nn.gelu_approx(pre)
    x = {"olmo2": resid_mid}.get(arch)
    if x is None:
        norm = block.pre_feedforward_layernorm if arch in POST_NORM else None
        x = (norm or block.post_attention_layernorm)(resid_mid)
    if arch == "phi3":
        pre, up = mx.split(block.mlp.gate_up_proj(x), 2, axis=-1)
    else:
        pre, up = block.mlp.gate_proj(x), block.mlp.up_proj(x)
    return pre, up, _act(arch)(pre) * up


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_attention_sites_equal_the_hand_forward(arch_model, layer):
    arch, model = arch_model
    rec, _ = _record_everything(model, TOKENS)
    hand = hand_attention(model, arch, layer, rec[f"layers.{layer}.resid_pre"])
    for name in ("q", "k", "v", "pattern"):
        got = _np(rec[f"layers.{layer}.attn.{name}"])
        np.testing.assert_allclose(got, hand[name], err_msg=f"{arch} {name}", **TOL)
    scores = _np(rec[f"layers.{layer}.attn.scores"])
    allowed = np.broadcast_to(hand["allowed"], scores.shape)
    np.testing.assert_allclose(scores[allowed], hand["scores"][allowed], **TOL)
    assert (scores[~allowed] <= np.finfo(np.float32).min).all()  # masked: float32's lowest
    np.testing.assert_allclose(_np(rec[f"layers.{layer}.attn.heads"]), hand["z"], **TOL)


def test_the_identities_between_sites(arch_model):
    arch, model = arch_model
    rec, logits = _record_everything(model, TOKENS)
    anatomy = anatomy_of(model)
    n_heads = _sizes(arch)[0]
    for i in range(3):
        block, get = model.layers[i], (lambda kind, i=i: rec[f"layers.{i}{kind}"])
        pattern, z = _np(get(".attn.pattern")), get(".attn.heads")
        np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
        v = np.repeat(_np(get(".attn.v")), n_heads // _np(get(".attn.v")).shape[2], axis=2)
        np.testing.assert_allclose(np.einsum("bhqk,bkhd->bqhd", pattern, v), _np(z), **TOL)
        o_proj = _attn(model, arch, i).c_proj if arch == "gpt2" else _attn(model, arch, i).o_proj
        attn_out = get(".attn")
        np.testing.assert_allclose(_np(o_proj(z.reshape(*z.shape[:2], -1))), _np(attn_out), **TOL)
        down = block.mlp.c_proj if arch == "gpt2" else block.mlp.down_proj
        np.testing.assert_allclose(_np(down(get(".mlp.post"))), _np(get(".mlp")), **TOL)
        added = block.post_attention_layernorm(attn_out) if arch in POST_NORM else attn_out
        np.testing.assert_allclose(_np(get(".resid_mid")), _np(get(".resid_pre") + added), **TOL)
        mlp_out = get(".mlp")
        added = block.post_feedforward_layernorm(mlp_out) if arch in POST_NORM else mlp_out
        np.testing.assert_allclose(_np(get("")), _np(get(".resid_mid") + added), **TOL)
        pre, up, post = hand_mlp(model, arch, i, get(".resid_mid"))
        np.testing.assert_allclose(_np(get(".mlp.pre")), _np(pre), **TOL)
        np.testing.assert_allclose(_np(get(".mlp.post")), _np(post), **TOL)
        if up is not None:
            np.testing.assert_allclose(_np(get(".mlp.pre_linear")), _np(up), **TOL)
        if i > 0:
            np.testing.assert_array_equal(_np(get(".resid_pre")), _np(rec[f"layers.{i - 1}"]))
    embed = model.model.wte(TOKENS) if arch == "gpt2" else _embed(model, arch, TOKENS)
    np.testing.assert_array_equal(_np(rec["embed"]), _np(embed))
    if arch != "gpt2":
        np.testing.assert_array_equal(_np(rec["embed"]), _np(rec["layers.0.resid_pre"]))
    plain = model(TOKENS)
    np.testing.assert_allclose(_np(rec["logits"]), _np(plain), **TOL)
    np.testing.assert_allclose(_np(logits), _np(plain), **TOL)
    lens = anatomy.unembed(rec["layers.2"])
    np.testing.assert_allclose(_np(lens), _np(plain), **TOL)


def test_boundary_sites_leave_the_fused_path_bit_identical(arch_model):
    """Sites outside attention's inner values record without changing a single bit."""
    _, model = arch_model
    kinds = ["resid_pre", "z", "attn_out", "mlp_pre", "mlp_post", "mlp_out", "resid_post"]
    names = ["embed", "logits"] + [(k, i) for i in range(3) for k in kinds]
    plain = np.array(model(TOKENS))
    with capture_sites(model, names) as rec:
        inside = np.array(model(TOKENS))
    np.testing.assert_array_equal(inside, plain)
    np.testing.assert_array_equal(np.array(rec.outputs["logits"]), plain)
    assert type(model).__name__ == "Model"  # restored


def _identity_on_patterns(model):
    return edit_sites(model, {("pattern", i): (lambda p: p) for i in range(3)})


def test_explicit_attention_with_the_kv_cache_equals_the_model(arch_model):
    """Generation through the explicit forward (its KV cache, rope offsets, gemma3's rotating
    window) gives the model's own logits, prompt and cached steps alike."""
    arch, model = arch_model
    prompt, steps = TOKENS[:, :7], [TOKENS[:, 7:8], TOKENS[:, 8:9], mx.array([[60]])]

    def run():
        cache = make_prompt_cache(model)
        out = [model(prompt, cache=cache)[:, -1]]
        out += [model(step, cache=cache)[:, -1] for step in steps]
        return np.array(mx.concatenate(out))

    plain = run()
    with _identity_on_patterns(model):
        explicit = run()
    np.testing.assert_allclose(explicit, plain, **TOL)
    with capture_sites(model, [("pattern", 1), ("q", 1)]) as rec:
        cache = make_prompt_cache(model)
        model(TOKENS[:, :8], cache=cache)
        model(TOKENS[:, 8:9], cache=cache)
        step_pattern, step_q = (
            _np(rec.outputs["layers.1.attn.pattern"]),
            _np(rec.outputs["layers.1.attn.q"]),
        )
        model(TOKENS)
        full_pattern, full_q = (
            _np(rec.outputs["layers.1.attn.pattern"]),
            _np(rec.outputs["layers.1.attn.q"]),
        )
    assert step_pattern.shape[2] == 1 and step_q.shape[1] == 1
    np.testing.assert_allclose(step_q[:, 0], full_q[:, -1], **TOL)  # rope at the cache offset
    np.testing.assert_allclose(step_pattern[:, :, 0], full_pattern[:, :, -1], **TOL)


def test_an_odd_layout_has_every_site_through_model_anatomy():
    model = odd_model()
    anatomy_of(model, ODD_ANATOMY)
    rec, logits = _record_everything(model, TOKENS)
    np.testing.assert_allclose(_np(logits), _np(model(TOKENS)), **TOL)
    block = model.backbone.blocks[1]
    x = rec["layers.1.resid_pre"]
    h = block.norm1(x)
    q = block.mixer.query(h).reshape(1, 9, 4, 8).transpose(0, 2, 1, 3)
    q = block.mixer.rotary(q).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(_np(rec["layers.1.attn.q"]), _np(q), **TOL)
    np.testing.assert_allclose(
        _np(rec["layers.1.resid_mid"]), _np(x + block.mixer(h, "causal")), **TOL
    )
    pattern = _np(rec["layers.1.attn.pattern"])
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        _np(block.ffn.w_out(rec["layers.1.mlp.post"])), _np(rec["layers.1.mlp"]), **TOL
    )


def test_a_misread_layout_fails_loudly_before_the_forward():
    """A norm named in the wrong role: the explicit block forward's self-check refuses it."""
    from mlx_interp.interventions.sites import SiteError

    model = odd_model()
    wrong = {**ODD_ANATOMY, "input_norm": "norm2", "pre_mlp_norm": "norm1"}
    anatomy_of(model, wrong)
    mx.eval(model.backbone.blocks[0].norm1.weight)
    model.backbone.blocks[0].norm1.weight = mx.full((32,), 3.0)  # make the two norms differ
    with pytest.raises(SiteError, match=r"explicit block forward differs .* model\.anatomy"):
        with capture_sites(model, [("resid_mid", 0)]):
            pass
    assert type(model.backbone.blocks[0]).__name__ == "_OddBlock"
