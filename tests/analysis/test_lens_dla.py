"""Logit lens and direct logit attribution on tiny models, against plain forwards and
activations captured by the site recorders (not the code under test)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_interp.analysis.dla import direct_logit_attribution
from mlx_interp.analysis.lens import LensError, logit_lens, unembed
from mlx_interp.interventions.sites import capture_sites
from tests.tiny_models import ARCHS, tiny_model

PROMPTS = [[5, 17, 9, 33, 2, 8, 41], [7, 19, 23, 50, 51, 52, 3]]


@pytest.mark.parametrize("arch", ARCHS)
def test_lens_at_the_last_layer_is_the_logits_and_earlier_layers_read_the_residual(arch):
    model = tiny_model(arch, seed=6)
    lens = logit_lens(model, PROMPTS)
    n_layers = len(model.layers)
    assert lens.shape == (2, n_layers, 7, 128)
    logits = np.array(model(mx.array(PROMPTS)).astype(mx.float32))
    np.testing.assert_allclose(lens[:, -1], logits, rtol=1e-4, atol=1e-4)
    with capture_sites(model, ["layers.0"]) as rec:
        model(mx.array(PROMPTS))
    early = np.array(unembed(model, rec.outputs["layers.0"]).astype(mx.float32))
    np.testing.assert_allclose(lens[:, 0], early, rtol=1e-4, atol=1e-4)
    some = logit_lens(model, PROMPTS, layers=[-1], positions=[-1, 2], ids=[4, 9])
    np.testing.assert_allclose(some[:, 0], logits[:, [-1, 2]][..., [4, 9]], rtol=1e-4, atol=1e-4)


def test_lens_takes_prompts_of_different_lengths_and_refuses_positions_outside():
    model = tiny_model("llama", seed=6)
    ragged = [PROMPTS[0], PROMPTS[1][:4]]
    lens = logit_lens(model, ragged, positions=[-1])
    for i, seq in enumerate(ragged):
        logits = np.array(model(mx.array([seq]))[0, -1].astype(mx.float32))
        np.testing.assert_allclose(lens[i, -1, 0], logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(LensError, match="outside"):
        logit_lens(model, ragged, positions=[5])


def _by_hand(model, prompt, plus, minus):
    """Shares by hand: each block output at the last token, divided by the final residual's
    RMS (eps included), times the final norm's weight and W_U[plus] - W_U[minus]."""
    n = len(model.layers)
    names = [f"layers.{i}{s}" for i in range(n) for s in ("", ".attn", ".mlp")]
    with capture_sites(model, names) as rec:
        logits = model(mx.array([prompt]))
    got = {
        k: np.array(v[0, -1].astype(mx.float32), dtype=np.float64) for k, v in rec.outputs.items()
    }
    final = got[f"layers.{n - 1}"]
    eps = model.model.norm.eps
    weight = np.array(model.model.norm.weight, dtype=np.float64)
    embed = np.array(model.model.embed_tokens.weight, dtype=np.float64)
    head = embed if model.args.tie_word_embeddings else np.array(model.lm_head.weight)
    read = weight * (head[plus] - head[minus]) / np.sqrt((final**2).mean() + eps)
    attn = [got[f"layers.{i}.attn"] @ read for i in range(n)]
    mlp = [got[f"layers.{i}.mlp"] @ read for i in range(n)]
    own = np.array(logits[0, -1].astype(mx.float32))
    return np.array(attn), np.array(mlp), own[plus] - own[minus]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
def test_dla_shares_by_hand_and_they_sum_to_the_logit_difference(arch):
    model = tiny_model(arch, seed=9)
    dla = direct_logit_attribution(model, PROMPTS, answers=([1, 4], [2, 6]))
    for i, (prompt, plus, minus) in enumerate(zip(PROMPTS, [1, 4], [2, 6], strict=True)):
        attn, mlp, own = _by_hand(model, prompt, plus, minus)
        np.testing.assert_allclose(dla.attn[i], attn, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(dla.mlp[i], mlp, rtol=1e-3, atol=1e-4)
        assert dla.logit_diff[i] == pytest.approx(own, abs=1e-4)
    total = dla.embed + dla.attn.sum(1) + dla.mlp.sum(1)
    np.testing.assert_allclose(total, dla.logit_diff, rtol=1e-4, atol=1e-4)  # no bias: all of it
    np.testing.assert_allclose(dla.remainder, 0.0, atol=1e-4)
    np.testing.assert_allclose(dla.heads.sum(2), dla.attn, rtol=1e-3, atol=1e-4)
    labels, values = dla.components()
    assert labels[:3] == ["embed", "attn 0", "mlp 0"] and values.shape == (2, 1 + 2 * 3)


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma2", "olmo2"])
def test_dla_of_blocks_with_post_norms_adds_up(arch):
    """Gemma and OLMo 2 norm each block's output before adding it: the shares are of what
    is added, so they still sum to the logit difference (gemma2 soft-caps its logits: that
    nonlinearity is the remainder) and the heads to their attention block."""
    model = tiny_model(arch, seed=2)
    dla = direct_logit_attribution(model, PROMPTS, answers=(1, 2))
    logits = np.array(model(mx.array(PROMPTS))[:, -1].astype(mx.float32))
    np.testing.assert_allclose(dla.logit_diff, logits[:, 1] - logits[:, 2], atol=1e-4)
    total = dla.embed + dla.attn.sum(1) + dla.mlp.sum(1) + dla.remainder
    np.testing.assert_allclose(total, dla.logit_diff, atol=1e-5)
    if arch != "gemma2":
        np.testing.assert_allclose(dla.remainder, 0.0, atol=1e-4)
    else:
        assert np.abs(dla.remainder).max() > 1e-4  # the soft-cap is not a sum of components
    np.testing.assert_allclose(dla.heads.sum(2), dla.attn, rtol=1e-3, atol=1e-4)


def test_dla_refuses_a_layer_norm_model():
    with pytest.raises(LensError, match="not an RMS norm"):
        direct_logit_attribution(tiny_model("gpt2", seed=1), PROMPTS, answers=(1, 2))
