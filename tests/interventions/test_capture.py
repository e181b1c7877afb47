"""mlx_interp.interventions.capture: class-swap activation capture on tiny mlx-lm models."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_interp.interventions.capture import (
    POSITIONS,
    LayerIndexError,
    capture_batch,
    capture_layers,
    decoder_layers,
    resolve_layers,
)
from tests.tiny_models import embed_and_run_layers, tiny_model

TOKENS = [[5, 9, 17, 3, 44, 2, 99, 12, 7]]  # longer than gemma3_text's sliding window (4)
SHORT = [11, 4, 60]
LONG = [11, 4, 60, 23, 8, 101, 77, 5]
TOL = {"rtol": 1e-5, "atol": 1e-5}


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


def test_last_token_capture_with_prefix_cache_equals_plain_capture(arch_model):
    from mlx_interp.interventions.prefix import shared_prefix

    _, model = arch_model
    prefix = [7, 3, 19, 42, 8, 11]
    sequences = [prefix + [5], prefix + [60, 23, 8], prefix + [9, 9], prefix + [100] * 5]
    shared = shared_prefix(model, sequences)
    if shared[1] is None:  # sliding-window or other non-plain caches: plain capture
        assert type(model).__module__.endswith("gemma3_text")
        return
    assert shared[0] == len(prefix)
    reused = capture_batch(model, sequences, layers=[0, -1], positions="last", prefix=shared)
    plain = capture_batch(model, sequences, layers=[0, -1], positions="last")
    for index, vectors in plain.items():
        np.testing.assert_allclose(reused[index], vectors, **TOL)
    # the other positions ignore the prefix (they need its activations)
    mean = capture_batch(model, sequences, layers=[1], positions="mean", prefix=shared)
    np.testing.assert_array_equal(mean[1], capture_batch(model, sequences, [1], "mean")[1])
    with pytest.raises(ValueError, match="prefix"):
        capture_batch(model, [prefix], [0], "last", prefix=shared)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("positions", POSITIONS)
def test_parts_round_trip_through_read_activations(tmp_path, dtype, positions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlx_interp.io.activations import batch_table, read_activations, write_part

    rng = np.random.default_rng(0)
    lengths = [2, 3, 4]
    if positions == "all":
        captured = {
            k: [rng.standard_normal((n, 8), dtype=np.float32) for n in lengths] for k in (0, 5)
        }
    else:
        captured = {k: rng.standard_normal((3, 8), dtype=np.float32) for k in (0, 5)}
    (tmp_path / "activations").mkdir()
    table = batch_table(["a", "b", "c"], captured, positions, lengths, dtype)
    assert pa.types.is_fixed_size_binary(table.schema.field("vector").type)
    write_part(table, tmp_path / "activations" / "part-00000.parquet")
    # a hand-written part with a list column (another artifact) reads the same way
    listed = pa.table(
        {
            "prompt_id": ["z"],
            "layer": pa.array([5], pa.int16()),
            "position": pa.array([0], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, dtype)), 8),
        }
    )
    (tmp_path / "listed" / "activations").mkdir(parents=True)
    pq.write_table(listed, tmp_path / "listed" / "activations" / "part-00000.parquet")
    df = read_activations(tmp_path)
    assert read_activations(tmp_path, [3]).empty
    got = df
    assert list(got.layer.unique()) == [0, 5]
    for layer in (0, 5):
        rows = got[got.layer == layer]
        expected = captured[layer] if positions != "all" else np.concatenate(captured[layer])
        np.testing.assert_array_equal(np.stack(rows.vector.to_numpy()), expected.astype(dtype))
        assert rows.vector.iloc[0].dtype == dtype
    if positions == "last":
        assert got.position.tolist()[:3] == [1, 2, 3]
    assert np.array_equal(read_activations(tmp_path / "listed").vector.iloc[0], np.ones(8, dtype))


def test_capture_batch_returns_the_asked_dtype():
    model = tiny_model("llama")
    f32 = capture_batch(model, [SHORT, LONG], [0], "last")[0]
    f16 = capture_batch(model, [SHORT, LONG], [0], "last", dtype=np.float16)[0]
    assert f32.dtype == np.float32 and f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    with pytest.raises(ValueError, match="float32 or float16"):
        capture_batch(model, [SHORT], [0], "last", dtype=np.int32)
