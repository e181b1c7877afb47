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
from tests.tiny_models import ODD_ANATOMY, _embed, odd_model

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


def _sizes(model, arch):
    """(n_heads, n_kv_heads, head_dim) from the model's config (ModelArgs)."""
    args = model.args
    if arch == "gpt2":
        return args.n_head, args.n_head, args.n_embd // args.n_head
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    return heads, getattr(args, "num_key_value_heads", None) or heads, head_dim


def hand_attention(model, arch, i, x):
    """q, k, v ``[b, s, heads, d]``, scores, pattern ``[b, heads, s, s]`` (masked scores
    -inf) and z ``[b, s, heads, d]`` of layer ``i`` from its input ``x``, written out."""
    block, attn = _block(model, arch, i), _attn(model, arch, i)
    n_heads, n_kv, d = _sizes(model, arch)
    args = model.args
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
    scale = getattr(args, "query_pre_attn_scalar", d) ** -0.5
    ke, ve = (np.repeat(a, n_heads // n_kv, axis=2) for a in (k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    if arch == "gemma2":
        cap = args.attn_logit_softcapping
        scores = cap * np.tanh(scores / cap)
    query, key = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = key <= query
    if arch == "gemma3_text" and (i + 1) % args.sliding_window_pattern:  # local layers
        allowed &= query - key < args.sliding_window
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


def _close(got, want, tol, what):
    """allclose with ``atol`` relative to the reference's scale (real models' activations
    reach hundreds)."""
    want = np.asarray(want, dtype=np.float64)
    atol = tol["atol"] * max(1.0, float(np.abs(want[np.isfinite(want)]).max(initial=0)))
    np.testing.assert_allclose(
        _np(got) if isinstance(got, mx.array) else got,
        want,
        rtol=tol["rtol"],
        atol=atol,
        err_msg=what,
    )


def check_attention(model, arch, rec, layer, tol=TOL):
    """The attention sites of ``layer`` against :func:`hand_attention`."""
    hand = hand_attention(model, arch, layer, rec[f"layers.{layer}.resid_pre"])
    for name in ("q", "k", "v", "pattern"):
        _close(rec[f"layers.{layer}.attn.{name}"], hand[name], tol, f"{arch} {layer} {name}")
    scores = _np(rec[f"layers.{layer}.attn.scores"])
    allowed = np.broadcast_to(hand["allowed"], scores.shape)
    _close(scores[allowed], hand["scores"][allowed], tol, f"{arch} {layer} scores")
    assert (scores[~allowed] <= np.finfo(np.float32).min).all()  # masked: float32's lowest
    _close(rec[f"layers.{layer}.attn.heads"], hand["z"], tol, f"{arch} {layer} z")


def check_identities(model, arch, rec, layers, tol=TOL):
    """The identities between the sites of each of ``layers`` (module docstring)."""
    n_heads = _sizes(model, arch)[0]
    for i in layers:
        block, get = model.layers[i], (lambda kind, i=i: rec[f"layers.{i}{kind}"])
        pattern, z = _np(get(".attn.pattern")), get(".attn.heads")
        np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
        v = _np(get(".attn.v"))
        v = np.repeat(v, n_heads // v.shape[2], axis=2)
        _close(np.einsum("bhqk,bkhd->bqhd", pattern, v), _np(z), tol, "pattern @ v = z")
        o_proj = _attn(model, arch, i).c_proj if arch == "gpt2" else _attn(model, arch, i).o_proj
        attn_out = get(".attn")
        _close(o_proj(z.reshape(*z.shape[:2], -1)), _np(attn_out), tol, "o_proj(z) = attn_out")
        down = block.mlp.c_proj if arch == "gpt2" else block.mlp.down_proj
        _close(down(get(".mlp.post")), _np(get(".mlp")), tol, "down(mlp_post) = mlp_out")
        added = block.post_attention_layernorm(attn_out) if arch in POST_NORM else attn_out
        _close(get(".resid_mid"), _np(get(".resid_pre") + added), tol, "resid_mid")
        mlp_out = get(".mlp")
        added = block.post_feedforward_layernorm(mlp_out) if arch in POST_NORM else mlp_out
        _close(get(""), _np(get(".resid_mid") + added), tol, "resid_post")
        pre, up, post = hand_mlp(model, arch, i, get(".resid_mid"))
        _close(get(".mlp.pre"), _np(pre), tol, "mlp_pre")
        _close(get(".mlp.post"), _np(post), tol, "mlp_post")
        if up is not None:
            _close(get(".mlp.pre_linear"), _np(up), tol, "mlp_pre_linear")
        if i > 0 and f"layers.{i - 1}" in rec:
            np.testing.assert_array_equal(_np(get(".resid_pre")), _np(rec[f"layers.{i - 1}"]))


def check_ends(model, arch, rec, tokens, tol=TOL):
    """``embed`` is the model's embedding; the logits and the last layer's lens are the
    model's own logits."""
    embed = model.model.wte(tokens) if arch == "gpt2" else _embed(model, arch, tokens)
    np.testing.assert_array_equal(_np(rec["embed"]), _np(embed))
    if arch != "gpt2":
        np.testing.assert_array_equal(_np(rec["embed"]), _np(rec["layers.0.resid_pre"]))
    plain = _np(model(tokens))
    _close(rec["logits"], plain, tol, "logits")
    last = len(model.layers) - 1
    _close(anatomy_of(model).unembed(rec[f"layers.{last}"]), plain, tol, "lens = logits")


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_attention_sites_equal_the_hand_forward(arch_model, layer):
    arch, model = arch_model
    rec, _ = _record_everything(model, TOKENS)
    check_attention(model, arch, rec, layer)


def test_the_identities_between_sites(arch_model):
    arch, model = arch_model
    rec, logits = _record_everything(model, TOKENS)
    check_identities(model, arch, rec, range(3))
    check_ends(model, arch, rec, TOKENS)
    _close(logits, _np(model(TOKENS)), TOL, "the recording forward's logits")


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


REAL_PROMPT = "When Mary and John went to the store, John gave a drink to"
REAL_TOL = {"rtol": 2e-3, "atol": 2e-4}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2_135m", "gemma3_270m"])
def test_real_models_anatomy_and_every_site(name):
    """The embedded models (float32 on the CPU): the anatomy is their module tree, and every
    site passes the checks above at every layer (attention by hand at three)."""
    import mlx_interp as mi

    lm = mi.load(name)
    model, arch = lm.model, type(lm.model).__module__.rsplit(".", 1)[-1]
    anatomy, body, args = anatomy_of(model), model.model, model.args
    assert (arch, anatomy.body, anatomy.embed) == (arch, body, body.embed_tokens)
    assert anatomy.layers == list(body.layers) and anatomy.final_norm is body.norm
    assert anatomy.tied == ("lm_head" not in model)
    heads, kv, head_dim = _sizes(model, arch)
    assert (anatomy.n_heads, anatomy.n_kv_heads, anatomy.head_dim) == (heads, kv, head_dim)
    assert anatomy.d_mlp == args.intermediate_size and anatomy.d_model == args.hidden_size
    for i, block in enumerate(body.layers):
        parts = anatomy.layer(i)
        assert parts.q_proj is block.self_attn.q_proj and parts.o_proj is block.self_attn.o_proj
        assert parts.gate_proj is block.mlp.gate_proj and parts.down_proj is block.mlp.down_proj
        assert parts.input_norm is block.input_layernorm
        if arch == "gemma3_text":
            assert parts.pre_mlp_norm is block.pre_feedforward_layernorm
            assert parts.post_mlp_norm is block.post_feedforward_layernorm
            assert parts.q_norm is block.self_attn.q_norm
            local = (i + 1) % args.sliding_window_pattern != 0
            assert anatomy.sliding_window(i) == (args.sliding_window if local else None)
        else:
            assert parts.pre_mlp_norm is block.post_attention_layernorm
    tokens = mx.array([lm.tokens(REAL_PROMPT)])
    rec, _ = _record_everything(model, tokens)
    n = len(body.layers)
    for layer in (0, n // 2, n - 1):
        check_attention(model, arch, rec, layer, REAL_TOL)
    check_identities(model, arch, rec, range(n), REAL_TOL)
    check_ends(model, arch, rec, tokens, REAL_TOL)
