"""Unsteered prompt states (interventions.unsteered) and the row caches they feed
(interventions.rowcache): equal to a plain forward, computed once, bounded in memory."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_interp.interventions import unsteered
from mlx_interp.interventions.rowcache import RowContext, cache_refusal
from mlx_interp.interventions.steering import LayerEdit, steer
from mlx_interp.interventions.unsteered import StateStore, prompt_states, swapped_classes
from tests.tiny_models import tiny_model

PREFIX = [5, 17, 9, 33, 2, 8, 41, 7]
SEQS = [PREFIX + [50, 51, 52], PREFIX + [60], PREFIX + [70, 71, 72, 73], PREFIX + [80, 81]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_prompt_states_equal_a_plain_forward(arch):
    model = tiny_model(arch, seed=1)
    states = prompt_states(model, SEQS, batch_size=3, store=StateStore())
    assert all(s.prefix.length == len(PREFIX) for s in states)
    for seq, state in zip(SEQS, states, strict=True):
        cache = make_prompt_cache(model)
        logits = model(mx.array([seq]), cache=cache)[0, -1]
        np.testing.assert_allclose(np.array(state.logits), np.array(logits), atol=1e-5)
        for layer, c in enumerate(cache):
            keys = np.array(c.keys[0, :, : len(seq)])  # [kv_heads, seq, head_dim]
            want = np.concatenate(
                [np.array(state.prefix.kv[layer][0][0]), np.array(state.keys[layer])], axis=1
            )
            np.testing.assert_allclose(want, keys, atol=1e-5)


def test_states_hold_the_last_tokens_residual_after_every_layer():
    from mlx_interp.interventions.capture import capture_layers

    model = tiny_model("llama", seed=6)
    states = prompt_states(model, SEQS, batch_size=3, store=StateStore())
    for seq, state in zip(SEQS, states, strict=True):
        with capture_layers(model) as rec:
            model(mx.array([seq]))
        want = np.stack([np.array(rec.outputs[i][0, -1]) for i in range(3)])
        np.testing.assert_allclose(np.array(state.last), want, atol=1e-5)


def test_states_are_computed_once_and_shared_across_calls(monkeypatch):
    model = tiny_model("llama", seed=2)
    store = StateStore()
    calls = []
    real = unsteered.last_logits
    monkeypatch.setattr(unsteered, "last_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prompt_states(model, SEQS, batch_size=4, store=store)
    n = len(calls)
    again = prompt_states(model, SEQS[1:3], store=store)  # a subset: nothing to compute
    assert len(calls) == n and again == first[1:3]
    more = prompt_states(model, [*SEQS, PREFIX + [90, 91]], batch_size=4, store=store)
    assert len(calls) == n + 1 and more[:4] == first  # only the new prompt ran


def test_the_store_stays_within_its_budget_and_forgets_a_dead_model():
    model = tiny_model("llama", seed=3)
    seqs = [PREFIX + [50 + i] for i in range(6)]
    unbounded = prompt_states(model, seqs, store=StateStore())
    prefix = unbounded[0].prefix.nbytes
    store = StateStore(budget_bytes=prefix + int(2.5 * unbounded[0].nbytes))
    prompt_states(model, seqs, batch_size=2, store=store)
    assert store.nbytes <= store.budget
    kept = [k for k in store.entries if k[1] == "prompt"]
    assert 0 < len(kept) <= 2 and kept[-1][2] == tuple(PREFIX + [55])  # the latest stay
    assert [k[1] for k in store.entries].count("prefix") == 1  # held while its prompts are
    del model
    gc.collect()
    assert not store.entries and store.nbytes == 0


def test_states_nbytes_are_the_prefix_once_plus_each_prompts_own_tokens():
    model = tiny_model("llama", seed=4)  # 3 layers, 4 kv heads of 8, vocab 128
    store = StateStore()
    states = prompt_states(model, SEQS, store=store)
    per_token = 3 * 2 * 4 * 8 * 4  # layers x (keys, values) x kv heads x head dim x float32
    own = sum(len(s) - len(PREFIX) for s in SEQS)
    per_prompt = 128 * 4 + 3 * 32 * 4  # answer logits, last token's residual after each layer
    assert sum(s.nbytes for s in states) == own * per_token + len(SEQS) * per_prompt
    assert states[0].prefix.nbytes == len(PREFIX) * per_token
    assert store.nbytes == own * per_token + len(SEQS) * per_prompt + len(PREFIX) * per_token


def test_a_model_inside_a_class_swap_is_named():
    model = tiny_model("llama", seed=5)
    assert swapped_classes(model) == []
    edit = LayerEdit(1, np.ones(model.args.hidden_size, np.float32))
    with steer(model, [edit], "add", 1.0):
        assert swapped_classes(model) == ["SteeringTransformerBlock"]
    assert swapped_classes(model) == []


def test_row_mask_hides_holes_and_applies_windows_on_true_positions():
    # row 0: columns hold positions 0..3, a hole, then its next token is 4
    # row 1: positions 0, 1 then two holes; next token is 2
    ctx = RowContext(np.array([[0, 1, 2, 3, -1], [0, 1, -1, -1, -1]]), 5, [4, 2])
    mask = np.array(ctx.mask(2))  # [2, 1, 2, 7]
    assert mask.shape == (2, 1, 2, 7)
    np.testing.assert_array_equal(mask[0, 0, 0], [1, 1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(mask[0, 0, 1], [1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(mask[1, 0, 1], [1, 1, 0, 0, 0, 1, 1])
    windowed = np.array(ctx.mask(1, window=2))
    np.testing.assert_array_equal(windowed[0, 0, 0], [0, 0, 0, 1, 0, 1])  # positions 3, 4
    ctx.advance(2, [2, 1])  # row 1's second new column is padding
    np.testing.assert_array_equal(np.array(ctx.positions)[:, 5:7], [[4, 5], [2, -1]])
    assert np.array(ctx.next_pos).tolist() == [6, 3]


def test_cache_refusal_names_the_window_and_other_caches():
    assert cache_refusal(tiny_model("llama"), 1000) is None
    gemma = tiny_model("gemma3_text")  # 4-token windows
    assert cache_refusal(gemma, 4) is None
    assert "4-token sliding window" in cache_refusal(gemma, 5)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_states_written_to_a_file_come_back_bit_for_bit_and_are_used(tmp_path, arch):
    """The baseline stage's file of states: read into a fresh store (a new process), every
    array equals the computed one, and rows continue from them (a key planted in the file
    changes the answer logits: the file is what they read, not a recomputation)."""
    from mlx_interp.interventions.batched_steering import steer_rows
    from mlx_interp.interventions.unsteered import load_states, save_states

    # gemma3: a window the prompts fit, so the rows path takes it (sliding layers still)
    model = tiny_model(arch, seed=7, **({"sliding_window": 32} if arch != "llama" else {}))
    first = StateStore()
    made = prompt_states(model, SEQS, batch_size=3, store=first)
    path = tmp_path / "states.safetensors"
    nbytes = save_states(path, model, [*SEQS, SEQS[0]], store=first)
    assert nbytes == made[0].prefix.nbytes + sum(s.nbytes for s in made)
    fresh = StateStore()
    assert load_states(path, model, store=fresh) == len(SEQS)
    assert load_states(path, model, store=fresh) == 0  # held already: nothing read again
    for want in made:
        got = fresh.get(model, "prompt", want.tokens)
        assert got.prefix is fresh.get(model, "prefix", PREFIX)
        for name in ("keys", "values", "logits", "last"):
            assert np.array_equal(np.array(getattr(got, name)), np.array(getattr(want, name)))
        for (k, v), (k2, v2) in zip(got.prefix.kv, want.prefix.kv, strict=True):
            assert np.array_equal(np.array(k), np.array(k2))
            assert np.array_equal(np.array(v), np.array(v2))

    class Unsteered:
        edits = ()
        alpha = 0.0

    pairs = [(p, 0) for p in range(len(SEQS))]
    rows = steer_rows(model, SEQS, pairs, [Unsteered()], positions="last", store=fresh)
    for row, state in zip(rows, made, strict=True):
        assert np.array_equal(row.logits, np.array(state.logits))
    planted = {k: v for k, v in mx.load(str(path)).items()}
    planted["p1.logits"] = planted["p1.logits"] + 1.0
    meta = unsteered._metadata(path)
    mx.save_safetensors(str(path), planted, metadata=meta)
    other = StateStore()
    load_states(path, model, store=other)
    rows = steer_rows(model, SEQS, pairs, [Unsteered()], positions="last", store=other)
    assert not np.array_equal(rows[1].logits, np.array(made[1].logits))


def test_a_file_of_another_models_states_is_refused(tmp_path):
    from mlx_interp.interventions.unsteered import StateFileError, load_states, save_states

    store = StateStore()
    small = tiny_model("llama", seed=7)
    prompt_states(small, SEQS, store=store)
    path = tmp_path / "states.safetensors"
    save_states(path, small, SEQS, store=store)
    other = tiny_model("gemma3_text", seed=7)
    with pytest.raises(StateFileError, match="another model's"):
        load_states(path, other, store=StateStore())
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(StateFileError, match="delete"):
        load_states(path, small, store=StateStore())
