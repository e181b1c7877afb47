"""llama.cpp control vectors: export, read back with the gguf package, import, round trip."""

import json

import gguf
import numpy as np
import pytest

from mlx_interp.analysis.directions import DirectionError, DirectionSet
from mlx_interp.apps.cv import main
from mlx_interp.io.control_vectors import (
    export_control_vector,
    import_control_vector,
    load_directions,
    resolve_directions_path,
)

D = 24


@pytest.fixture
def dirset():
    """Layers 0, 3, 7 of random vectors and class means (PCA-like: vector != pos - neg)."""
    rng = np.random.default_rng(7)
    layers = (0, 3, 7)
    vectors = {k: rng.standard_normal(D) for k in layers}
    pos = {k: rng.standard_normal(D) + 1 for k in layers}
    neg = {k: rng.standard_normal(D) - 1 for k in layers}
    return DirectionSet(vectors, pos, neg, "pca", ("red", "green"), {"model": "tiny", "n": 3})


def test_gguf_reader_sees_a_llama_cpp_control_vector(tmp_path, dirset):
    path = tmp_path / "cv.gguf"
    written = export_control_vector(dirset, path, alpha=2.5, model_hint="llama")
    assert written == [3, 7]  # layer 0 skipped: llama.cpp cannot steer block 0
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.contents() == 2 and layer_count.types == [gguf.GGUFValueType.INT32]
    assert sorted(t.name for t in reader.tensors) == ["direction.3", "direction.7"]
    for tensor in reader.tensors:
        layer = int(tensor.name.split(".")[1])
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [D]
        np.testing.assert_allclose(tensor.data, 2.5 * dirset.vectors[layer], rtol=1e-6)


def test_unit_export_writes_alpha_times_unit_vector(tmp_path, dirset):
    path = tmp_path / "unit.gguf"
    export_control_vector(dirset, path, alpha=3.0, unit=True, layers=[7])
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.name == "direction.7"
    np.testing.assert_allclose(np.linalg.norm(tensor.data), 3.0, rtol=1e-6)
    np.testing.assert_allclose(tensor.data, 3.0 * dirset.unit(7), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha,unit", [(1.0, False), (2.0, False), (0.7, True)])
def test_round_trip(tmp_path, dirset, alpha, unit):
    path = tmp_path / "cv.gguf"
    export_control_vector(dirset, path, alpha=alpha, unit=unit, layers=[3, 7])
    back = import_control_vector(path)
    assert back.layers == [3, 7]
    assert back.method == "pca" and back.contrast == ("red", "green")
    assert back.meta["model"] == "tiny" and back.meta["model_hint"] == "llama"
    for layer in back.layers:
        assert back.vectors[layer].shape == (D,) and back.vectors[layer].dtype == np.float32
        if alpha in (1.0, 2.0) and not unit:  # powers of two: the scaling is exact
            np.testing.assert_array_equal(back.vectors[layer], dirset.vectors[layer])
        else:
            np.testing.assert_allclose(back.vectors[layer], dirset.vectors[layer], rtol=1e-5)
        np.testing.assert_array_equal(back.pos_means[layer], dirset.pos_means[layer])
        np.testing.assert_array_equal(back.neg_means[layer], dirset.neg_means[layer])


def test_import_foreign_repeng_style_file(tmp_path):
    """A file as repeng writes it: uint32 layer_count, no mlx_interp metadata."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 2)
    rng = np.random.default_rng(0)
    vecs = {1: rng.standard_normal(D).astype(np.float32), 5: rng.standard_normal(D).astype("f4")}
    for layer, v in vecs.items():
        writer.add_tensor(f"direction.{layer}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = load_directions(path)
    assert back.layers == [1, 5] and back.meta["model_hint"] == "mistral"
    assert back.meta["centers_known"] is False
    for layer, v in vecs.items():
        np.testing.assert_array_equal(back.vectors[layer], v)
        np.testing.assert_allclose(back.center(layer), 0.0, atol=1e-7)


def test_bad_inputs_name_the_problem(tmp_path, dirset):
    with pytest.raises(DirectionError, match="layer 0 cannot be exported"):
        export_control_vector(dirset, tmp_path / "x.gguf", layers=[0, 3])
    with pytest.raises(DirectionError, match=r"layers \[5\] are not in the direction set"):
        export_control_vector(dirset, tmp_path / "x.gguf", layers=[5])
    with pytest.raises(DirectionError, match="non-zero alpha"):
        export_control_vector(dirset, tmp_path / "x.gguf", alpha=float("nan"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    with pytest.raises(DirectionError, match="not a readable GGUF"):
        import_control_vector(tmp_path / "junk.gguf")
    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, D), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DirectionError, match="not a control vector"):
        import_control_vector(model)
    with pytest.raises(DirectionError, match="no direction file"):
        resolve_directions_path(tmp_path / "missing")


def test_artifact_folder_fills_provenance(tmp_path, dirset):
    """An artifact folder: the manifest key and the capture artifact's model fill meta."""
    root = tmp_path / "artifacts"
    art = root / "directions" / "abc123"
    art.mkdir(parents=True)
    (root / "capture" / "cap9").mkdir(parents=True)
    (root / "capture" / "cap9" / "meta.json").write_text(json.dumps({"model": "smollm2_135m"}))
    dirset.meta.pop("model")
    dirset.save(art / "directions.safetensors")
    manifest = {"key": "abc123", "record": {"upstream": {"capture": "cap9"}}}
    (art / "_manifest.json").write_text(json.dumps(manifest))
    loaded = load_directions(art)
    assert loaded.meta["artifact_key"] == "abc123" and loaded.meta["model"] == "smollm2_135m"


def test_cli_export_import_show(tmp_path, dirset, capsys):
    src = tmp_path / "d.safetensors"
    dirset.save(src)
    assert (
        main(["export", str(src), str(tmp_path / "cv.gguf"), "--alpha", "2", "--layers", "7"]) == 0
    )
    assert "direction.{7}" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "cv.gguf"), str(tmp_path / "back.safetensors")]) == 0
    back = DirectionSet.load(tmp_path / "back.safetensors")
    np.testing.assert_array_equal(back.vectors[7], dirset.vectors[7])
    assert main(["show", str(tmp_path / "cv.gguf")]) == 0
    assert "model_hint: llama" in capsys.readouterr().out
    assert main(["export", str(src), str(tmp_path / "bad.gguf"), "--layers", "0"]) == 2
    assert "layer 0 cannot be exported" in capsys.readouterr().err
