"""The answer-word direction against the model's own final norm and head (the logit lens)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_interp.analysis.lens import LensError, answer_direction
from mlx_interp.models.anatomy import AnatomyError, anatomy_of

POS, NEG = [3, 17], [5]


def _lens_diff(model, h: np.ndarray) -> np.ndarray:
    """The lens's logit difference before any soft-capping (gemma2's tanh is not linear)."""
    head = anatomy_of(model).unembed(mx.array(h, dtype=mx.float32), softcap=False)
    logits = np.array(head.astype(mx.float32))
    return logits[:, POS].mean(axis=1) - logits[:, NEG].mean(axis=1)


def test_projection_is_the_lens_logit_difference(arch_model):
    """h . u / rms(h) equals the lens's mean(pos) - mean(neg) logit difference for every
    architecture (Gemma's 1 + w norm included), so its sign is the lens's answer."""
    name, model = arch_model
    if name == "gpt2":  # LayerNorm final norm (ln_f), no model.norm: refused by name
        with pytest.raises(LensError):
            answer_direction(model, POS, NEG)
        return
    u = answer_direction(model, POS, NEG)
    h = np.random.default_rng(0).normal(size=(6, len(u))) * 10  # rms >> eps
    want = _lens_diff(model, h)
    bias = getattr(getattr(model, "lm_head", None), "bias", None)
    if bias is not None:  # a head bias shifts every logit: not part of the direction
        b = np.array(bias.astype(mx.float32))
        want = want - (b[POS].mean() - b[NEG].mean())
    got = (h @ u) / np.sqrt((h**2).mean(axis=1))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_reflection_through_origin_negates_the_lens_difference(arch_model):
    name, model = arch_model
    if name == "gpt2":
        pytest.skip("gpt2's final LayerNorm is refused (test above)")
    u = answer_direction(model, POS, NEG)
    unit = u / np.linalg.norm(u)
    h = np.random.default_rng(1).normal(size=(4, len(u))) * 10
    mirrored = h - 2 * (h @ unit)[:, None] * unit  # norm-preserving: the rms is unchanged
    bias = getattr(getattr(model, "lm_head", None), "bias", None)
    shift = 0.0
    if bias is not None:
        b = np.array(bias.astype(mx.float32))
        shift = b[POS].mean() - b[NEG].mean()
    before = _lens_diff(model, h) - shift
    after = _lens_diff(model, mirrored) - shift
    np.testing.assert_allclose(after, -before, rtol=2e-3, atol=2e-3 * np.abs(before).max())


def test_quantized_head_matches_dequantized():
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", seed=3, tie_word_embeddings=False, hidden_size=64)
    plain = answer_direction(model, POS, NEG)
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    quantized = answer_direction(model, POS, NEG)
    assert np.corrcoef(plain, quantized)[0, 1] > 0.999


def test_refusals():
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    with pytest.raises(LensError, match="both words"):
        answer_direction(model, [], NEG)
    with pytest.raises(AnatomyError, match="model.anatomy"):  # no layers, no final norm
        answer_direction(nn.Linear(2, 2), POS, NEG)
