"""Prefix-cache reuse is exact: same logits and tokens as full forwards, steered or not."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_interp.interventions.prefix import batched_last_logits, common_prefix_len, greedy_generate
from mlx_interp.interventions.steering import LayerEdit, ReflectMode, generate_steered, steer
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
    from mlx_interp.analysis.scoring import LogitScorer, Steering

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
    from mlx_interp.interventions.prefix import batched_last_logits, shared_prefix

    prefix = shared_prefix(model, SEQS)
    with steer(model, list(edits), ReflectMode(), 1.0):
        reused = batched_last_logits(model, SEQS, 0, 2, prefix)
    np.testing.assert_allclose(reused, full, atol=2e-5, rtol=1e-4)


# --- batched greedy generation ------------------------------------------------------------

RAGGED = [PREFIX + [50, 51, 52], PREFIX[:6] + [60], [3, 4] + PREFIX, PREFIX + [80, 81] * 4, [9]]


class _EosTok(_Tok):
    def __init__(self, eos):
        self.eos_token_id = eos


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("use_prefix", [True, False])
def test_batched_greedy_equals_per_prompt_greedy(arch, use_prefix):
    model = tiny_model(arch, seed=4)
    d = model.args.hidden_size if hasattr(model.args, "hidden_size") else model.args.n_embd
    rng = np.random.default_rng(3)
    edits = [LayerEdit(1, 2 * rng.standard_normal(d).astype(np.float32), np.zeros(d, np.float32))]
    seqs = SEQS if use_prefix else RAGGED
    prefix = None if use_prefix else False
    with steer(model, edits, ReflectMode(), 1.0):
        one = greedy_generate(model, _Tok(), seqs, max_tokens=9, prefix=prefix, batch_size=1)
        # an EOS that some rows reach early (rows leave the batch at different steps)
        eos = one[1][1][2]
        one = greedy_generate(model, _EosTok(eos), seqs, 9, prefix=prefix, batch_size=1)
        many = greedy_generate(model, _EosTok(eos), seqs, 9, prefix=prefix, batch_size=3)
    assert [ids for _, ids in many] == [ids for _, ids in one]
    assert len({len(ids) for _, ids in one}) > 1  # rows stopped at different steps


def test_last_logits_head_only_at_last_positions_equals_full_logits():
    from mlx_interp.interventions.prefix import head_at, last_logits

    model = tiny_model("llama", seed=5)
    tokens = mx.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    full = model(tokens)
    got = last_logits(model, tokens, [3, 1])
    np.testing.assert_allclose(
        np.array(got), np.array(full[mx.array([0, 1]), mx.array([3, 1])]), atol=1e-5
    )
    with head_at(model, mx.array([3, 1])):
        assert model(tokens).shape == (2, 1, full.shape[-1])
    assert model(tokens).shape == full.shape  # class restored


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_per_prompt_greedy():
    from mlx_interp.models.loading import load_model

    lm = load_model({"name": "smollm2_135m", "source": "embedded", "dequantize": "auto"})
    system = [{"role": "system", "content": "Answer with one word."}]
    questions = [
        "What colour is grass?",
        "What colour is the sky?",
        "What is 2+2?",
        "Name a fruit.",
        "What colour is a tomato?",
        "Capital of France?",
    ]
    seqs = [
        lm.tokenizer.apply_chat_template(
            system + [{"role": "user", "content": q}], add_generation_prompt=True
        )
        for q in questions
    ]
    one = greedy_generate(lm.model, lm.tokenizer, seqs, max_tokens=10, batch_size=1)
    many = greedy_generate(lm.model, lm.tokenizer, seqs, max_tokens=10, batch_size=4)
    assert [ids for _, ids in many] == [ids for _, ids in one]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_one_prompt_greedy_equals_mlx_lm_generate_step(arch):
    """The one-prompt loop (whole prompt in one forward; the path of models whose caches do
    not batch, e.g. Gemma 3's sliding window) gives mlx-lm's own greedy tokens."""
    from mlx_lm.generate import generate_step

    from mlx_interp.interventions.prefix import batchable

    model = tiny_model(arch, seed=6)
    assert batchable(model) == (arch == "llama")
    for seq in RAGGED[:4]:
        want = [int(t) for t, _ in generate_step(mx.array(seq), model, max_tokens=9)]
        got = greedy_generate(model, _EosTok(-1), [seq], max_tokens=9, prefix=False)
        assert got[0][1] == want


@pytest.mark.parametrize("positions", ["last", "object"])
def test_per_row_positions_on_a_model_whose_cache_does_not_batch(positions):
    """Steering at per-row positions on tiny Gemma 3 (sliding-window caches: each prompt
    decodes alone): generation runs, moves the answers, and its first token is the argmax
    of the logit scorer's steered logits (two code paths: batched forward vs decode loop)."""
    from mlx_interp.analysis.scoring import GenerateScorer, LogitScorer, Steering

    model = tiny_model("gemma3_text", seed=7)

    class _LM:  # the scorers' view of a loaded model
        pass

    class _WordTok(_EosTok):
        def encode(self, text, add_special_tokens=False):
            return [len(text.strip())]  # any word -> one id

    lm = _LM()
    lm.model, lm.tokenizer, lm.pad_id = model, _WordTok(-1), 0
    d = model.args.hidden_size
    rng = np.random.default_rng(5)
    edit = LayerEdit(0, 6 * rng.standard_normal(d).astype(np.float32), np.zeros(d, np.float32))
    steering = Steering((edit,), "add", 1.0, positions)
    seqs = RAGGED[:4]
    spans = [(1, 3)] * len(seqs)
    words = ["a", "b"]
    args = (lm, seqs, ["a"] * 4, ["b"] * 4, words, steering, 0)
    gen = GenerateScorer(max_tokens=4)(*args, spans=spans)
    plain = GenerateScorer(max_tokens=4)(*args[:5], Steering((), None, 0.0), 0)
    assert [g["token_ids"] for g in gen] != [p["token_ids"] for p in plain]
    assert len({g["token_ids"][0] for g in gen}) > 1  # not one saturated token
    tops = [row["top_token"] for row in LogitScorer()(*args, spans=spans)]  # decode: "id"
    assert [str(g["token_ids"][0]) for g in gen] == tops
