"""FromPosition (the chat's `last` rule in streaming generation) edits exactly what the
steer stage's per-row `last` mask edits: the last prompt token and every generated token."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_interp.interventions.positions import (
    FromPosition,
    GatedMode,
    PositionGate,
    position_mask,
)
from mlx_interp.interventions.steering import LayerEdit, make_mode, steer
from tests.tiny_models import tiny_model

TOKENS = [5, 17, 3, 99, 42, 7, 11]


def _width(model) -> int:
    return model.args.hidden_size


def test_prefill_in_chunks_equals_the_last_mask_and_decode_steps_are_edited():
    model = tiny_model("llama")
    rng = np.random.default_rng(0)
    edit = [LayerEdit(1, rng.standard_normal(_width(model)).astype(np.float32))]
    full = mx.array([TOKENS])
    gate = PositionGate(generated=True)
    gate.set(position_mask("last", [len(TOKENS)], 0, None))
    with steer(model, edit, GatedMode(make_mode("add"), gate), 3.0):
        masked = np.array(model(full))
    with steer(model, edit, FromPosition(make_mode("add"), start=len(TOKENS) - 1), 3.0):
        whole = np.array(model(full))
    np.testing.assert_allclose(whole, masked, rtol=1e-6, atol=1e-6)
    with steer(model, edit, "add", 0.0):
        plain = np.array(model(full))
    assert np.allclose(whole[0, :-1], plain[0, :-1]) and not np.allclose(whole[0, -1], plain[0, -1])

    from mlx_lm.models.cache import make_prompt_cache

    mode = FromPosition(make_mode("add"), start=len(TOKENS) - 1)
    with steer(model, edit, mode, 3.0):  # chunks of 4 + 3 then one decode step, with a cache
        cache = make_prompt_cache(model)
        model(mx.array([TOKENS[:4]]), cache=cache)
        last = np.array(model(mx.array([TOKENS[4:]]), cache=cache))
        step = np.array(model(mx.array([[8]]), cache=cache))
    np.testing.assert_allclose(last[0, -1], masked[0, -1], rtol=1e-4, atol=1e-4)
    gate = PositionGate(generated=True)  # the stage's rule: masked prompt, edited decode steps
    gate.set(position_mask("last", [len(TOKENS)], 0, None))
    with steer(model, edit, GatedMode(make_mode("add"), gate), 3.0):
        cache = make_prompt_cache(model)
        model(full, cache=cache)
        reference = np.array(model(mx.array([[8]]), cache=cache))
    np.testing.assert_allclose(step, reference, rtol=1e-4, atol=1e-4)
    with steer(model, edit, "add", 0.0):
        cache = make_prompt_cache(model)
        model(full, cache=cache)
        unsteered = np.array(model(mx.array([[8]]), cache=cache))
    assert not np.allclose(step, unsteered, atol=1e-3)  # the decode step was edited
