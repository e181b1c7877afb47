"""mlx_interp.interventions.edits: function and mode edits at every site, at any position,
and the order of recording and editing at one site."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_interp.interventions.cache_run import run_with_cache
from mlx_interp.interventions.modes import SteeringError
from mlx_interp.interventions.sites import (
    Edit,
    SiteEdit,
    SiteError,
    capture_sites,
    edit_sites,
    steer_sites,
)
from mlx_interp.interventions.token_positions import PositionError, row_lengths
from tests.tiny_models import tiny_model

TOKENS = mx.array([[5, 9, 17, 3, 44, 2, 99, 12, 7]])
TOL = {"rtol": 1e-4, "atol": 2e-5}


def _np(a):
    return np.array(a.astype(mx.float32))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("mistral")  # grouped-query heads, untied head


@pytest.mark.parametrize(
    "site",
    [
        "layers.1.attn.heads",
        "layers.1",
        "layers.1.attn.pattern",
        "layers.1.mlp.post",
        "layers.1.resid_mid",
        "layers.1.attn.k",
    ],
)
def test_recording_inside_an_edit_sees_the_edit_outside_sees_before(llama, site):
    double = {site: lambda v: v * 2.0}
    with capture_sites(llama, [site]) as outside:
        with edit_sites(llama, double):
            with capture_sites(llama, [site]) as inside:
                llama(TOKENS)
    np.testing.assert_allclose(_np(inside.outputs[site]), 2 * _np(outside.outputs[site]), rtol=1e-6)
    assert type(llama.layers[1]).__name__ == "TransformerBlock"


def test_a_pattern_edit_flows_into_z_and_the_logits(arch_model):
    arch, model = arch_model
    sites = ["layers.1.attn.pattern", "layers.1.attn.v", "layers.1.attn.heads", "layers.1.attn"]

    def no_first_token(pattern):  # attention to token 0 removed, rows renormalized
        kept = pattern * (mx.arange(pattern.shape[-1]) > 0).astype(pattern.dtype)
        return kept / mx.maximum(kept.sum(-1, keepdims=True), 1e-9)

    plain = _np(model(TOKENS))
    with edit_sites(model, {"blocks.1.attn.hook_pattern": no_first_token}):
        with capture_sites(model, sites) as rec:
            edited = _np(model(TOKENS))
    pattern = _np(rec.outputs[sites[0]])
    assert np.abs(pattern[:, :, 1:, 0]).max() == 0.0
    np.testing.assert_allclose(pattern[:, :, 1:].sum(-1), 1.0, atol=1e-5)
    v = _np(rec.outputs[sites[1]])
    v = np.repeat(v, pattern.shape[1] // v.shape[2], axis=2)
    z = np.einsum("bhqk,bkhd->bqhd", pattern, v)
    np.testing.assert_allclose(_np(rec.outputs[sites[2]]), z, **TOL)
    assert not np.allclose(edited, plain, atol=1e-4)


@pytest.mark.parametrize(
    ("positions", "changed"),
    [("last", [8]), (-1, [8]), ([0, -2], [0, 7]), ([[3, 4]], [3, 4]), (2, [2]), ("all", range(9))],
)
def test_edits_touch_exactly_their_positions(llama, positions, changed):
    with capture_sites(llama, ["layers.1"]) as plain:
        llama(TOKENS)
    with edit_sites(llama, {"layers.1": lambda h: h + 1.0}, positions=positions):
        with capture_sites(llama, ["layers.1"]) as rec:
            llama(TOKENS)
    moved = np.abs(_np(rec.outputs["layers.1"]) - _np(plain.outputs["layers.1"])).max(-1)[0]
    np.testing.assert_array_equal(np.flatnonzero(moved > 0.5), list(changed))
    assert moved[[i for i in range(9) if i not in changed]].max(initial=0) == 0.0


def test_query_positions_of_a_pattern_edit(llama):
    with edit_sites(llama, {("pattern", 0): lambda p: p * 0}, positions=[-1]):
        with capture_sites(llama, [("pattern", 0)]) as rec:
            llama(TOKENS)
    pattern = _np(rec.outputs["layers.0.attn.pattern"])
    assert pattern[:, :, -1].max() == 0 and pattern[:, :, :-1].sum(-1).min() > 0.99


def test_per_row_positions_follow_each_rows_length_in_a_padded_batch(llama):
    short, long = [11, 4, 60], [11, 4, 60, 23, 8, 101, 77, 5]
    edit = {"layers.0.mlp": lambda h: h + 3.0}
    with edit_sites(llama, edit, positions="last"):
        _, batched, lengths = run_with_cache(llama, [short, long], ["layers.1"], "last")
    for row, seq in enumerate([short, long]):
        with edit_sites(llama, edit, positions="last"):
            _, alone, _ = run_with_cache(llama, [seq], ["layers.1"], "last")
        np.testing.assert_allclose(
            _np(batched[next(iter(batched))][row]), _np(alone[next(iter(alone))][0]), **TOL
        )
    assert lengths == [3, 8]
    with pytest.raises(PositionError, match="outside row 0's 3 tokens"):
        with edit_sites(llama, edit, positions=[5]), row_lengths([3, 8]):
            run_with_cache(llama, [short, long], ["layers.1"])


def test_cached_generation_with_a_positioned_edit_equals_recompute(arch_model):
    """Edit the last prompt token only: decode steps are left alone, like a full recompute
    that edits that one absolute position."""
    _, model = arch_model
    prompt = [5, 9, 17, 3, 44]
    edit = {("resid_post", 1): lambda h: h * 3.0}
    with edit_sites(model, edit, positions=-1):
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt]), cache=cache)[:, -1]
        cached = []
        for _ in range(4):
            token = int(mx.argmax(logits, -1).item())
            cached.append(token)
            logits = model(mx.array([[token]]), cache=cache)[:, -1]
    seq = list(prompt)
    with edit_sites(model, edit, positions=len(prompt) - 1):
        for _ in range(4):
            seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    assert cached == seq[len(prompt) :]


def test_mode_edits_at_inner_sites_by_name_and_target(llama):
    vector = np.random.default_rng(0).standard_normal(96).astype(np.float32)  # d_mlp
    with capture_sites(llama, ["layers.1.mlp.post"]) as plain:
        llama(TOKENS)
    before = _np(plain.outputs["layers.1.mlp.post"])
    target = {"_target_": "mlx_interp.interventions.modes.AddMode"}
    for mode in ("add", target):
        with steer_sites(
            llama, [SiteEdit("blocks.1.mlp.hook_post", vector, positions=[0])], mode, 2.0
        ):
            with capture_sites(llama, ["layers.1.mlp.post"]) as rec:
                llama(TOKENS)
        got = _np(rec.outputs["layers.1.mlp.post"])
        np.testing.assert_allclose(got[0, 0], before[0, 0] + 2 * vector, **TOL)
        np.testing.assert_array_equal(got[0, 1:], before[0, 1:])


def test_a_resid_mid_edit_reaches_the_mlp_and_the_block_output(arch_model):
    arch, model = arch_model
    shift = lambda h: h + 0.5  # noqa: E731
    sites = ["layers.1.resid_mid", "layers.1.mlp", "layers.1"]
    with edit_sites(model, {"layers.1.resid_mid": shift}):
        with capture_sites(model, sites) as rec:
            model(TOKENS)
    block = model.layers[1]
    mlp_out = rec.outputs["layers.1.mlp"]
    post = (
        block.post_feedforward_layernorm(mlp_out)
        if arch in ("gemma2", "gemma3_text", "olmo2")
        else mlp_out
    )
    np.testing.assert_allclose(
        _np(rec.outputs["layers.1"]), _np(rec.outputs["layers.1.resid_mid"] + post), **TOL
    )


def test_embed_edit_equals_resid_pre_edit_of_layer_zero(llama):
    bump = lambda h: h * 1.5  # noqa: E731
    with edit_sites(llama, {"embed": bump}):
        by_embed = _np(llama(TOKENS))
    with edit_sites(llama, {"blocks.0.hook_resid_pre": bump}):
        by_resid = _np(llama(TOKENS))
    np.testing.assert_array_equal(by_embed, by_resid)
    assert not np.allclose(by_embed, _np(llama(TOKENS)))


def test_zero_queries_give_uniform_attention(llama):
    with edit_sites(llama, {("q", 0): lambda q: q * 0}):
        with capture_sites(llama, [("pattern", 0)]) as rec:
            llama(TOKENS)
    pattern = _np(rec.outputs["layers.0.attn.pattern"])[0, 0]
    np.testing.assert_allclose(pattern[4, :5], 0.2, atol=1e-6)


def test_per_row_vectors_at_a_site(llama):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((2, 1, 64)).astype(np.float32)
    batch = mx.concatenate([TOKENS, TOKENS])
    with steer_sites(llama, [SiteEdit("layers.0.mlp", rows)], "add", 1.0):
        together = _np(llama(batch))
    for row in range(2):
        with steer_sites(llama, [SiteEdit("layers.0.mlp", rows[row, 0])], "add", 1.0):
            np.testing.assert_allclose(together[row], _np(llama(TOKENS))[0], **TOL)


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({"layers.1": lambda h: h[:, :1]}, r"returned \(1, 1, 64\) for a value of shape"),
        ({"layers.1": lambda h: 3}, "returned int"),
    ],
)
def test_bad_edit_functions_are_named(llama, edits, match):
    with pytest.raises(SiteError, match=match), edit_sites(llama, edits):
        llama(TOKENS)
    assert type(llama.layers[1]).__name__ == "TransformerBlock"


def test_bad_edit_requests_fail_before_touching_the_model(llama):
    classes = [type(m) for _, m in llama.named_modules()]
    with pytest.raises(SiteError, match="callable"), edit_sites(llama, [Edit("layers.1", 3)]):
        pass
    with pytest.raises(SteeringError, match="function edit"):
        with steer_sites(llama, [SiteEdit("layers.1.attn.pattern", np.ones(9))], "add", 1.0):
            pass
    with pytest.raises(PositionError, match="positions must be"):
        with edit_sites(llama, {"layers.1": lambda h: h}, positions=[1.5]):
            pass
    with pytest.raises(SiteError, match="no pre_linear"):
        with edit_sites(tiny_model("gpt2"), {"layers.1.mlp.pre_linear": lambda h: h}):
            pass
    assert [type(m) for _, m in llama.named_modules()] == classes
