"""The fast path (settings as rows of batched forwards on reused unsteered states) equals the
plain path (each setting on its own, ``Scorer.__call__``): every answer logit within 1e-4 and
identical greedy tokens, for every position rule, every steering mode (MODES and
conf/steer/mode) and both alpha signs, on tiny llama and gemma3 models; and a difference
planted at one reused position makes the same comparison fail."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mlx_interp.analysis.scoring import UNSTEERED, GenerateScorer, LogitScorer, Steering
from mlx_interp.interventions import unsteered
from mlx_interp.interventions.batched_steering import FastPathRefused, steer_rows
from mlx_interp.interventions.modes import (
    PLAIN_MODES,
    ConditionalMode,
    NormPreservingMode,
    make_mode,
)
from mlx_interp.interventions.steering import LayerEdit
from tests.tiny_models import tiny_model

PREFIX = [5, 17, 9, 33, 2, 8, 41, 7, 19, 23, 11, 4]
SUFFIXES = [[50, 51, 52, 3], [60, 61, 3], [70, 71, 72, 73, 74, 3], [80, 81, 3], [90, 3]]
SEQS = [PREFIX + s for s in SUFFIXES]
SPANS = [(12, 14), (12, 13), (13, 15), (12, 13), (12, 13)]  # the object: inside the suffix
RULES = ["all", "suffix", "last", "object"]
EOS = 6
N_GEN = 6


class _Tok:
    """Just what the scorers need: words -> one id each, ids -> text, one EOS id."""

    eos_token_ids = {EOS}

    def encode(self, text, add_special_tokens=False):
        return [{"green": 10, "red": 20}.get(text.strip().lower(), 30)]

    def decode(self, ids):
        return " ".join(map(str, ids))


class _LM:
    def __init__(self, model):
        self.model, self.tokenizer, self.pad_id = model, _Tok(), 0


class RawLogits(LogitScorer):
    """A logit scorer that keeps every logit: the equivalence is checked on all of them."""

    def from_logits(self, lm, logits, original, target, words):
        return [{"logits": np.asarray(row)} for row in logits]


def _modes(d: int) -> dict:
    rng = np.random.default_rng(11)
    modes = {name: make_mode(name) for name in PLAIN_MODES}
    modes["add_norm"] = NormPreservingMode("add")
    coef = -rng.standard_normal(d).astype(np.float32)  # fires at some positions, not all
    modes["conditional"] = ConditionalMode("reflect", coef=coef, intercept=0.0)
    return modes


MODE_NAMES = list(dict.fromkeys([*PLAIN_MODES, "add_norm", "conditional"]))


def _model(arch: str, window: int = 64):
    extra = {"sliding_window": window} if arch == "gemma3_text" else {}
    return tiny_model(arch, seed=3, **extra)


def _settings(model, mode, positions: str) -> list[Steering]:
    """Main-like and random-like settings, both alpha signs, plus the unsteered one."""
    d = model.args.hidden_size
    rng = np.random.default_rng(5)
    out = []
    for alpha in (1.5, -0.8, 2.5):
        edit = LayerEdit(
            1,
            3 * rng.standard_normal(d).astype(np.float32),
            rng.standard_normal(d).astype(np.float32),
        )
        out.append(Steering((edit,), mode, alpha, positions))
    return [*out, UNSTEERED]


def assert_equivalent(fast: list[dict], plain: list[dict]) -> None:
    """Every logit within 1e-4 absolute; identical greedy token ids."""
    assert len(fast) == len(plain)
    for f, p in zip(fast, plain, strict=True):
        if "logits" in p:
            np.testing.assert_allclose(f["logits"], p["logits"], atol=1e-4, rtol=0)
        if "token_ids" in p:
            assert f["token_ids"] == p["token_ids"]


def _both(scorer, lm, settings):
    n = len(SEQS)
    args = (lm, SEQS, ["green"] * n, ["red"] * n, ["green", "red"], settings)
    pairs = [(p, s) for s in range(len(settings)) for p in range(n)]
    fast = scorer._fast(*args, pairs, 0, SPANS)  # raises FastPathRefused: never a silent fallback
    plain = scorer._plain(*args, pairs, 0, SPANS)
    return fast, plain


@pytest.fixture(autouse=True)
def _fresh_store():
    unsteered.STORE.clear()
    yield
    unsteered.STORE.clear()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode_name", MODE_NAMES)
def test_fast_path_equals_plain_path_logits(arch, rule, mode_name):
    model = _model(arch)
    lm = _LM(model)
    mode = _modes(model.args.hidden_size)[mode_name]
    fast, plain = _both(RawLogits(batch_size=2), lm, _settings(model, mode, rule))
    assert_equivalent(fast, plain)
    # the settings differ from each other and from unsteered: the test can see a wrong row
    n = len(SEQS)
    by_setting = [np.stack([row["logits"] for row in plain[s * n : (s + 1) * n]]) for s in range(4)]
    assert not np.allclose(by_setting[0], by_setting[1], atol=1e-3)
    assert not np.allclose(by_setting[0], by_setting[3], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode_name", MODE_NAMES)
def test_fast_path_equals_plain_path_greedy_tokens(arch, rule, mode_name):
    model = _model(arch)
    lm = _LM(model)
    mode = _modes(model.args.hidden_size)[mode_name]
    fast, plain = _both(
        GenerateScorer(max_tokens=N_GEN, batch_size=2), lm, _settings(model, mode, rule)
    )
    assert_equivalent(fast, plain)
    lengths = {len(row["token_ids"]) for row in plain}
    assert len(lengths) > 1 or N_GEN in lengths


def test_last_token_rows_start_at_the_first_edited_layer(monkeypatch):
    """Logit rows of `last` start at the edited layer from the stored unsteered residual
    (the layers below are not run) and still equal the plain path; every-layer modes and
    generation run every layer."""
    import mlx_interp.interventions.rows as rows

    started = []
    real = rows.start_at_layer

    def spy(model, layer, residual):
        started.append((layer, residual.shape))
        return real(model, layer, residual)

    monkeypatch.setattr(rows, "start_at_layer", spy)
    model = _model("llama")
    lm = _LM(model)
    settings = _settings(model, make_mode("reflect"), "last")
    fast, plain = _both(RawLogits(), lm, settings)
    assert_equivalent(fast, plain)
    assert started and {layer for layer, _ in started} == {1}
    started.clear()
    _both(RawLogits(), lm, _settings(model, make_mode("ablate_all"), "last"))
    _both(GenerateScorer(max_tokens=3), lm, settings)
    assert started == []


def test_a_difference_planted_at_one_reused_position_is_caught():
    """Nudge one key of one prompt's stored unsteered states (a position the `last` rule
    reuses): the fast path's answers move and the equivalence check fails."""
    model = _model("llama")
    lm = _LM(model)
    settings = _settings(model, make_mode("reflect"), "last")
    fast, plain = _both(RawLogits(), lm, settings)
    assert_equivalent(fast, plain)
    state = unsteered.STORE.get(model, "prompt", SEQS[2])
    assert state is not None
    keys = np.array(state.keys)
    keys[:, :, 1] += 0.05  # one own position (token 13), every layer
    import mlx.core as mx

    state.keys = mx.array(keys)
    planted, _ = _both(RawLogits(), lm, settings)
    with pytest.raises(AssertionError):
        assert_equivalent(planted, plain)
    # and the residual a last-token row starts from (layer 0's output of prompt 4)
    other = unsteered.STORE.get(model, "prompt", SEQS[4])
    residual = np.array(other.last)
    residual[0] += 0.05
    other.last = mx.array(residual)
    planted, _ = _both(RawLogits(), lm, settings)
    n = len(SEQS)
    with pytest.raises(AssertionError):
        assert_equivalent([planted[4]], [plain[4]])  # prompt 4, main setting
    assert_equivalent([planted[3 * n + 4]], [plain[3 * n + 4]])  # unsteered: logits stored


def test_sliding_window_shorter_than_the_prompts_is_refused_by_name_and_falls_back(caplog):
    model = _model("gemma3_text", window=4)  # windows of 4 tokens, prompts of 14-18
    lm = _LM(model)
    settings = _settings(model, make_mode("reflect"), "last")
    with pytest.raises(FastPathRefused, match="4-token sliding window"):
        steer_rows(model, SEQS, [(0, 0)], settings, "reflect", "last")
    n = len(SEQS)
    args = (lm, SEQS, ["green"] * n, ["red"] * n, ["green", "red"], settings)
    with caplog.at_level(logging.INFO, logger="mlx_interp.analysis.scoring"):
        got = RawLogits().score_settings(*args, spans=SPANS)
    assert_equivalent(
        got, RawLogits()._plain(*args, [(p, s) for s in range(4) for p in range(n)], 0, SPANS)
    )
    assert "sliding window" in caplog.text


def test_a_model_inside_a_class_swap_is_refused():
    from mlx_interp.interventions.steering import steer

    model = _model("llama")
    settings = _settings(model, make_mode("add"), "last")
    with steer(model, list(settings[0].edits), "add", 1.0):
        with pytest.raises(FastPathRefused, match="class swap"):
            steer_rows(model, SEQS, [(0, 3)], settings, "add", "last")


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
def test_smollm2_fast_path_equals_plain_path(rule):
    """SmolLM2 on few-shot chat prompts: margins within 1e-4 and identical greedy tokens for
    the main and a random-like direction (both alpha signs) and unsteered."""
    from mlx_interp.models.loading import load_model

    lm = load_model({"name": "smollm2_135m", "source": "embedded", "dequantize": "auto"})
    tok = lm.tokenizer
    shots = [("What colour is a pumpkin?", "Orange."), ("What colour is a canary?", "Yellow.")]
    questions = ["What colour is grass?", "What colour is a ripe tomato?", "What colour is snow?"]
    chats = []
    for q in questions:
        turns = [{"role": "system", "content": "Answer with one word."}]
        for text, answer in shots:
            turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        chats.append(
            tok.apply_chat_template(
                [*turns, {"role": "user", "content": q}], add_generation_prompt=True
            )
        )
    spans = []
    for seq, q in zip(chats, questions, strict=True):
        from mlx_interp.interventions.positions import object_span

        spans.append(object_span(tok, seq, q.split(" is ")[1].rstrip("?")))
    rng = np.random.default_rng(0)
    d = lm.d_model
    settings = [
        Steering(
            (
                LayerEdit(
                    20, 8 * rng.standard_normal(d).astype(np.float32), np.zeros(d, np.float32)
                ),
            ),
            make_mode("reflect"),
            alpha,
            rule,
        )
        for alpha in (2.0, -1.0)
    ] + [UNSTEERED]
    n = len(chats)
    args = (lm, chats, ["green"] * n, ["red"] * n, ["green", "red"], settings)
    pairs = [(p, s) for s in range(len(settings)) for p in range(n)]
    for scorer in (RawLogits(), GenerateScorer(max_tokens=8)):
        fast = scorer._fast(*args, pairs, lm.pad_id, spans)
        plain = scorer._plain(*args, pairs, lm.pad_id, spans)
        assert_equivalent(fast, plain)
