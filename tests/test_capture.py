"""Tests for pipeline.capture: class-swap activation capture on tiny mlx-lm models."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from pipeline.capture import (
    POSITIONS,
    LayerIndexError,
    capture_batch,
    capture_layers,
    decoder_layers,
    resolve_layers,
)
from tests.tiny_models import ARCHS, embed_and_run_layers, tiny_model

TOKENS = [[5, 9, 17, 3, 44, 2, 99, 12, 7]]  # longer than gemma3_text's sliding window (4)
SHORT = [11, 4, 60]
LONG = [11, 4, 60, 23, 8, 101, 77, 5]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param)


def _param_names(model) -> list[str]:
    return [name for name, _ in tree_flatten(model.parameters())]


def test_captured_outputs_match_reference_forward(arch_model):
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    with capture_layers(model, [0, 1, -1]) as recorder:
        model(tokens)
    n_layers = len(model.layers)
    assert sorted(recorder.outputs) == [0, 1, n_layers - 1]
    for index in (0, 1, -1):
        captured = recorder.outputs[index % n_layers]
        expected = embed_and_run_layers(model, arch, tokens, index)
        assert captured.shape == expected.shape
        np.testing.assert_array_equal(np.array(captured), np.array(expected))


def test_classes_and_logits_restored(arch_model):
    _, model = arch_model
    tokens = mx.array(TOKENS)
    classes = [type(layer) for layer in model.layers]
    names = _param_names(model)
    before = np.array(model(tokens))
    with capture_layers(model) as recorder:
        assert all(type(a) is not b for a, b in zip(model.layers, classes, strict=True))
        assert all(isinstance(a, b) for a, b in zip(model.layers, classes, strict=True))
        assert _param_names(model) == names
        model(tokens)
    assert len(recorder.outputs) == len(classes)
    assert [type(layer) for layer in model.layers] == classes
    assert _param_names(model) == names
    assert np.array_equal(np.array(model(tokens)), before)


def test_classes_restored_when_body_raises(arch_model):
    _, model = arch_model
    classes = [type(layer) for layer in model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layers(model, [0, -1]):
            model(mx.array(TOKENS))
            raise RuntimeError("boom")
    assert [type(layer) for layer in model.layers] == classes


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_padding_does_not_change_vectors(arch_model, positions):
    _, model = arch_model
    batched = capture_batch(model, [SHORT, LONG], layers=[0, -1], positions=positions, pad_id=0)
    alone = capture_batch(model, [SHORT], layers=[0, -1], positions=positions)
    long_alone = capture_batch(model, [LONG], layers=[0, -1], positions=positions)
    assert sorted(batched) == [0, len(model.layers) - 1]
    for index, vectors in batched.items():
        assert vectors.dtype == np.float32
        assert vectors.shape == (2, alone[index].shape[1])
        np.testing.assert_allclose(vectors[0], alone[index][0], **TOL)
        np.testing.assert_allclose(vectors[1], long_alone[index][0], **TOL)


def test_positions_all_matches_last_and_mean(arch_model):
    _, model = arch_model
    sequences = [SHORT, LONG]
    per_token = capture_batch(model, sequences, layers=[1], positions="all")[1]
    last = capture_batch(model, sequences, layers=[1], positions="last")[1]
    mean = capture_batch(model, sequences, layers=[1], positions="mean")[1]
    assert [rows.shape[0] for rows in per_token] == [len(seq) for seq in sequences]
    for row, rows in enumerate(per_token):
        assert rows.dtype == np.float32
        np.testing.assert_array_equal(rows[-1], last[row])
        np.testing.assert_allclose(rows.mean(axis=0), mean[row], **TOL)


def test_stop_after_last_gives_same_vector(arch_model):
    _, model = arch_model
    tokens = mx.array(TOKENS)
    with capture_layers(model, [1]) as full:
        logits = full.run(model, tokens)
    with capture_layers(model, [1], stop_after_last=True) as stopped:
        assert stopped.run(model, tokens) is None
    assert logits is not None
    np.testing.assert_array_equal(np.array(stopped.outputs[1]), np.array(full.outputs[1]))


def test_stop_escaping_the_body_is_suppressed():
    model = tiny_model("llama")
    classes = [type(layer) for layer in model.layers]
    reached_end = False
    with capture_layers(model, [0], stop_after_last=True) as recorder:
        model(mx.array(TOKENS))
        reached_end = True
    assert not reached_end
    assert 0 in recorder.outputs
    assert [type(layer) for layer in model.layers] == classes


def test_capture_batch_stops_after_last_layer():
    model = tiny_model("qwen2")
    calls = []
    original = type(model.layers[2])

    class Spy(original):  # later layers must not run
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return original.__call__(self, *args, **kwargs)

    model.layers[2].__class__ = Spy
    try:
        capture_batch(model, [SHORT], layers=[0, 1])
    finally:
        model.layers[2].__class__ = original
    assert calls == []


def test_resolve_layers():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers([-1, 0, -4, 3], 4) == [0, 3]
    assert resolve_layers([2, -2], 5) == [2, 3]
    with pytest.raises(LayerIndexError, match=r"layer 40 is out of range .* 30 layers"):
        resolve_layers([40], 30)
    with pytest.raises(LayerIndexError, match=r"valid: -30\.\.29"):
        resolve_layers([-31], 30)
    with pytest.raises(IndexError):
        resolve_layers([3], 3)


def test_capture_out_of_range_layer_raises_and_leaves_model_untouched():
    model = tiny_model("gpt2")
    classes = [type(layer) for layer in model.layers]
    with pytest.raises(LayerIndexError, match=r"valid: -3\.\.2"):
        with capture_layers(model, [0, 7]):
            pass
    assert [type(layer) for layer in model.layers] == classes


def test_capture_batch_rejects_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="last, all, mean"):
        capture_batch(model, [SHORT], positions="first")
    with pytest.raises(ValueError, match="empty"):
        capture_batch(model, [SHORT, []])
    with pytest.raises(ValueError):
        capture_batch(model, [])
    assert POSITIONS == ("last", "all", "mean")


def test_model_without_layers_raises_type_error():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="model.layers"):
        decoder_layers(NoLayers())
    with pytest.raises(TypeError, match="NoLayers"):
        with capture_layers(NoLayers()):
            pass
