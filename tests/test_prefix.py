"""Prefix-cache reuse is exact: same logits and tokens as full forwards, steered or not."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pipeline.prefix import batched_last_logits, common_prefix_len, greedy_generate
from pipeline.steering import LayerEdit, ReflectMode, generate_steered, steer
from tests.tiny_models import tiny_model

PREFIX = [5, 17, 9, 33, 2, 8, 41, 7, 19, 23]
SEQS = [PREFIX + [50, 51, 52], PREFIX + [60], PREFIX + [70, 71, 72, 73, 74], PREFIX + [80, 81]]


class _Tok:
    eos_token_id = 127

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_common_prefix_len():
    assert common_prefix_len(SEQS) == len(PREFIX)
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps one own token
    assert common_prefix_len([[1, 2], [3, 4]]) == 0


def _full_last_logits(model, seqs):
    return np.stack([np.array(model(mx.array([s]))[0, -1].astype(mx.float32)) for s in seqs])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("steered", [False, True])
def test_prefix_logits_equal_full_forwards(arch, steered):
    model = tiny_model(arch, seed=1)
    d = model.args.hidden_size if hasattr(model.args, "hidden_size") else model.args.n_embd
    rng = np.random.default_rng(0)
    edits = [LayerEdit(1, rng.standard_normal(d).astype(np.float32), np.zeros(d, np.float32))]
    with steer(model, edits if steered else [], ReflectMode(), 1.0):
        full = _full_last_logits(model, SEQS)
        reused = batched_last_logits(model, SEQS, pad_id=0, batch_size=3)
        plain = batched_last_logits(model, SEQS, pad_id=0, batch_size=3, prefix=False)
    np.testing.assert_allclose(reused, full, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(plain, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_generation_equals_full_prompt_generation(arch):
    model = tiny_model(arch, seed=2)
    d = model.args.hidden_size
    rng = np.random.default_rng(1)
    edits = [LayerEdit(0, 3 * rng.standard_normal(d).astype(np.float32), np.zeros(d, np.float32))]
    with steer(model, edits, ReflectMode(), 1.0):
        reused = greedy_generate(model, _Tok(), SEQS, max_tokens=10)
    for seq, (_, ids) in zip(SEQS, reused, strict=True):
        _, expected = generate_steered(model, _Tok(), seq, edits, ReflectMode(), 1.0, max_tokens=10)
        assert ids == expected


class _SuffixOnly:
    """Reference mode for a full forward: edit only positions >= start (prefill), all decode."""

    def __init__(self, mode, start):
        self.mode, self.start = mode, start

    def __call__(self, h, vector, center, alpha):
        if h.shape[1] == 1:
            return self.mode(h, vector, center, alpha)
        edited = self.mode(h[:, self.start :], vector, center, alpha)
        return mx.concatenate([h[:, : self.start], edited], axis=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_suffix_positions_equal_a_position_masked_full_forward(arch):
    from pipeline.scoring import LogitScorer, Steering

    model = tiny_model(arch, seed=3)
    d = model.args.hidden_size
    rng = np.random.default_rng(2)
    edits = (LayerEdit(1, 2 * rng.standard_normal(d).astype(np.float32), np.zeros(d, np.float32)),)

    class LM:
        pass

    lm = LM()
    lm.model, lm.tokenizer = (
        model,
        type("T", (), {"decode": lambda self, ids: str(ids), "encode": lambda self, t, **k: [3]})(),
    )
    words = ["green", "red"]
    scorer = LogitScorer(batch_size=2)
    got = scorer(
        lm,
        SEQS,
        ["green"] * 4,
        ["red"] * 4,
        words,
        Steering(edits, ReflectMode(), 1.0, positions="suffix"),
    )
    reference_mode = _SuffixOnly(ReflectMode(), len(PREFIX))
    with steer(model, list(edits), reference_mode, 1.0):
        full = _full_last_logits(model, SEQS)
    with steer(model, list(edits), ReflectMode(), 1.0):
        everywhere = _full_last_logits(model, SEQS)
    for row, ref in zip(got, full, strict=True):
        assert row["margin"] == pytest.approx(0.0, abs=1e-6)  # same token for both words here
        assert row["top_token"] == str([int(np.argmax(ref))])
    assert not np.allclose(full, everywhere)  # the prefix edit matters, so the test can fail
    # and the logits themselves agree with the reference
    from pipeline.prefix import batched_last_logits, shared_prefix

    prefix = shared_prefix(model, SEQS)
    with steer(model, list(edits), ReflectMode(), 1.0):
        reused = batched_last_logits(model, SEQS, 0, 2, prefix)
    np.testing.assert_allclose(reused, full, atol=2e-5, rtol=1e-4)
