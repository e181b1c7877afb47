"""Direction maths on synthetic data with a planted answer (no model needed)."""

import json

import numpy as np
import pytest
from hydra.utils import instantiate
from safetensors import safe_open

from mlx_interp.analysis.directions import (
    METHODS,
    DirectionError,
    DirectionSet,
    LogisticDirection,
    MeanDiff,
    PCADiff,
    cosine_matrix,
    extract,
    make_method,
)

D, N = 64, 200


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def unit(rng, d=D):
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


@pytest.fixture
def planted():
    """pos = N(0, I) + 4p, neg = N(0, I) - 4p with a unit planted direction p.

    At +/-3 the sampling noise of the class means alone puts cos(mean diff, p) at 0.990-0.992
    (d=64, n=200), so a 0.99 bar would test the seed, not the method.
    """
    rng = np.random.default_rng(0)
    p = unit(rng)
    pos = rng.standard_normal((N, D)) + 4 * p
    neg = rng.standard_normal((N, D)) - 4 * p
    return pos, neg, p


def nuisance_data(seed, sigma=1.5):
    """Heavy isotropic noise and a nuisance direction u shared by both classes.

    u carries a large common offset and a large per-pair variance (row i of pos and of neg
    share it, as two prompts that differ only in the concept would).
    """
    rng = np.random.default_rng(seed)
    p = unit(rng)
    u = rng.standard_normal(D)
    u -= (u @ p) * p
    u /= np.linalg.norm(u)
    shared = (50 + 10 * rng.standard_normal(N))[:, None] * u
    pos = sigma * rng.standard_normal((N, D)) + 3 * p + shared
    neg = sigma * rng.standard_normal((N, D)) - 3 * p + shared
    return pos, neg, p, u


ALL = [MeanDiff(), PCADiff(), LogisticDirection(C=0.01)]


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_methods_recover_planted_direction_pointing_neg_to_pos(planted, method):
    pos, neg, p = planted
    v = method.fit(pos, neg)
    assert v.shape == (D,)
    assert cos(v, p) > 0.99  # positive: points from neg to pos
    # every method is scaled to the mean-difference norm, so steering alphas are comparable
    assert np.linalg.norm(v) == pytest.approx(np.linalg.norm(pos.mean(0) - neg.mean(0)))
    swapped = method.fit(neg, pos)
    assert cos(swapped, p) < -0.99


def test_logistic_default_c_is_pos_ward_but_noisier(planted):
    """C=1 overfits linearly separable data (d=64, n=400): still the planted one, less exactly."""
    pos, neg, p = planted
    v = LogisticDirection().fit(pos, neg)
    assert 0.95 < cos(v, p) < cos(LogisticDirection(C=0.01).fit(pos, neg), p)


def test_mean_diff_is_exact_mean_difference(planted):
    pos, neg, _ = planted
    np.testing.assert_allclose(MeanDiff().fit(pos, neg), pos.mean(0) - neg.mean(0), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_methods_ignore_shared_nuisance_under_heavy_noise(seed):
    pos, neg, p, u = nuisance_data(seed)
    pairs = np.stack([np.arange(N), np.arange(N)], axis=1)
    for method in ALL:
        v = method.fit(pos, neg, pairs)
        assert cos(v, p) > 0.95, method.name
        assert abs(cos(v, u)) < 0.1, method.name


def test_pca_uses_pairs_to_cancel_within_pair_variance():
    """Without the pairing, the nuisance variance dominates the uncentered differences."""
    pos, neg, p, u = nuisance_data(0)
    assert abs(cos(PCADiff().fit(pos, neg), u)) > 0.9
    pairs = np.stack([np.arange(N), np.arange(N)], axis=1)
    assert cos(PCADiff().fit(pos, neg, pairs), p) > 0.95


def test_pca_all_pairs_closed_form_matches_explicit_pairs():
    """pairs=None uses every (pos, neg) pair through a closed-form Gram matrix."""
    rng = np.random.default_rng(4)
    p = unit(rng)
    pos = rng.standard_normal((30, D)) + 100 + 2 * p  # a large common offset must not matter
    neg = rng.standard_normal((25, D)) + 100 - 2 * p
    every = np.array([(i, j) for i in range(30) for j in range(25)])
    implicit, explicit = PCADiff().fit(pos, neg), PCADiff().fit(pos, neg, every)
    np.testing.assert_allclose(implicit, explicit, rtol=1e-8, atol=1e-10)
    top = np.linalg.svd(pos[every[:, 0]] - neg[every[:, 1]], full_matrices=False)[2][0]
    assert abs(cos(implicit, top)) > 1 - 1e-10


def test_pca_large_d_path_matches_dense():
    """d > 512 uses Lanczos; it must agree with the dense eigensolver."""
    rng = np.random.default_rng(5)
    d = 600
    p = unit(rng, d)
    pos = rng.standard_normal((40, d)) + 8 * p
    neg = rng.standard_normal((40, d)) - 8 * p
    v = PCADiff().fit(pos, neg)
    diffs = (pos[:, None, :] - neg[None, :, :]).reshape(-1, d)
    top = np.linalg.svd(diffs, full_matrices=False)[2][0]
    assert abs(cos(v, top)) > 0.9999 and cos(v, p) > 0.9


def test_hydra_instantiate_and_make_method():
    pkg = "mlx_interp.analysis.directions"
    assert isinstance(instantiate({"_target_": f"{pkg}.MeanDiff"}), MeanDiff)
    m = instantiate({"_target_": f"{pkg}.LogisticDirection", "C": 0.5, "seed": 1})
    assert (m.C, m.seed) == (0.5, 1)
    assert isinstance(make_method({"_target_": f"{pkg}.PCADiff", "seed": 2}), PCADiff)
    for name, cls in METHODS.items():
        assert isinstance(make_method(name), cls)
    assert make_method(m) is m
    with pytest.raises(DirectionError, match="choose one of"):
        make_method("meandiff")


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_errors_name_the_fix(planted, method):
    pos, neg, _ = planted
    with pytest.raises(DirectionError, match="'neg' has 1 row"):
        method.fit(pos, neg[:1])
    bad = pos.copy()
    bad[3, 5] = np.nan
    with pytest.raises(DirectionError, match="NaN/inf in 1 row"):
        method.fit(bad, neg)
    with pytest.raises(DirectionError, match="same layer"):
        method.fit(pos, neg[:, :10])
    with pytest.raises(DirectionError, match="identical means: choose another layer or contrast"):
        method.fit(pos, pos[::-1].copy())


def test_pairs_are_validated(planted):
    pos, neg, _ = planted
    with pytest.raises(DirectionError, match="within each class"):
        PCADiff().fit(pos[:5], neg[:5], np.array([[0, 7]]))
    with pytest.raises(DirectionError, match=r"\[n_pairs, 2\]"):
        PCADiff().fit(pos, neg, np.array([0, 1]))


def make_acts(seed=0, layers=(3, 7)):
    rng = np.random.default_rng(seed)
    ps = {layer: unit(rng) for layer in layers}
    cond = np.array(["red"] * 50 + ["blue"] * 40 + ["other"] * 10)
    sign = np.where(cond == "red", 1.0, np.where(cond == "blue", -1.0, 0.0))
    acts = {
        layer: (rng.standard_normal((100, D)) + 5 + 5 * sign[:, None] * ps[layer]).astype(
            np.float16
        )
        for layer in layers
    }
    return acts, cond, ps


@pytest.mark.parametrize("name", list(METHODS))
def test_extract_builds_a_direction_set(name):
    acts, cond, ps = make_acts()
    ds = extract(acts, cond == "red", cond == "blue", name, ("red", "blue"))
    assert ds.layers == [3, 7] and ds.method == name and ds.contrast == ("red", "blue")
    assert ds.meta["n_pos"] == 50 and ds.meta["n_neg"] == 40
    for layer, p in ps.items():
        assert ds.cosine(ds, layer) == pytest.approx(1.0)
        assert cos(ds.vectors[layer], p) > 0.95  # float16 activations, 50 vs 40 prompts
        red = acts[layer][cond == "red"].astype(np.float64).mean(0)
        np.testing.assert_allclose(ds.pos_means[layer], red, rtol=1e-6)
        np.testing.assert_allclose(ds.center(layer), (red + ds.neg_means[layer]) / 2, rtol=1e-6)
        assert np.linalg.norm(ds.unit(layer)) == pytest.approx(1.0)


def test_extract_errors_name_condition_and_layer():
    acts, cond, _ = make_acts()
    with pytest.raises(DirectionError, match="'green' has 0 prompt"):
        extract(acts, cond == "red", cond == "green", "mean_diff", ("red", "green"))
    with pytest.raises(DirectionError, match="disjoint"):
        extract(acts, cond != "blue", cond != "red", "mean_diff", ("a", "b"))
    same = {3: np.tile(np.arange(D, dtype=float), (100, 1))}
    with pytest.raises(DirectionError, match="at layer 3 .*identical means"):
        extract(same, cond == "red", cond == "blue", "pca", ("red", "blue"))


@pytest.fixture
def dirset():
    acts, cond, _ = make_acts()
    return extract(acts, cond == "red", cond == "blue", "pca", ("red", "blue"))


def test_save_load_round_trip(tmp_path, dirset):
    dirset.meta["note"] = {"layers": [3, 7], "why": "test"}
    path = tmp_path / "directions.safetensors"
    dirset.save(path)
    loaded = DirectionSet.load(path)
    assert loaded.layers == dirset.layers and loaded.method == "pca"
    assert loaded.contrast == ("red", "blue") and loaded.meta == json.loads(json.dumps(dirset.meta))
    for layer in dirset.layers:
        for a, b in [(loaded.vectors, dirset.vectors), (loaded.pos_means, dirset.pos_means)]:
            np.testing.assert_array_equal(a[layer], b[layer])
        np.testing.assert_array_equal(loaded.neg_means[layer], dirset.neg_means[layer])
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == {
            f"{p}.{k}" for p in ("direction", "pos_mean", "neg_mean") for k in (3, 7)
        }
        assert json.loads(f.metadata()["layers"]) == [3, 7]


def test_load_rejects_foreign_and_incomplete_files(tmp_path, dirset):
    from safetensors.numpy import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DirectionError, match="not a readable"):
        DirectionSet.load(tmp_path / "junk.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DirectionError, match="not a directions file"):
        DirectionSet.load(tmp_path / "other.safetensors")
    dirset.save(tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "neg_mean.7"}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(DirectionError, match=r"missing \['neg_mean.7'\]"):
        DirectionSet.load(tmp_path / "cut.safetensors")


def test_arithmetic(dirset):
    acts, cond, _ = make_acts(seed=1)
    other = extract(acts, cond == "red", cond == "other", "mean_diff", ("red", "other"))
    total = dirset + other
    for k in dirset.layers:
        np.testing.assert_allclose(total.vectors[k], dirset.vectors[k] + other.vectors[k])
        np.testing.assert_allclose(
            (dirset - other).vectors[k], dirset.vectors[k] - other.vectors[k]
        )
        np.testing.assert_allclose((2 * dirset).vectors[k], 2 * dirset.vectors[k])
        np.testing.assert_allclose((dirset * 0.5).center(k), dirset.center(k), rtol=1e-6)
        neg = -dirset
        np.testing.assert_array_equal(neg.vectors[k], -dirset.vectors[k])
        np.testing.assert_array_equal(neg.pos_means[k], dirset.neg_means[k])
        np.testing.assert_allclose(total.center(k), (dirset.center(k) + other.center(k)) / 2)
    assert (-dirset).contrast == ("blue", "red")
    assert total.contrast == ("red+red", "blue+other") and total.method == "pca+mean_diff"
    assert (dirset * -1).contrast == ("blue", "red")
    with pytest.raises(DirectionError, match="layers differ"):
        dirset + extract({3: acts[3]}, cond == "red", cond == "blue", "pca", ("red", "blue"))
    with pytest.raises(TypeError):
        dirset + 1


def test_random_like_same_norms_centers_seeded_and_near_orthogonal():
    rng = np.random.default_rng(0)
    d = 4096
    vec = {0: rng.standard_normal(d) * 3, 5: rng.standard_normal(d)}
    means = {k: rng.standard_normal(d) for k in vec}
    ds = DirectionSet(vec, {k: means[k] + vec[k] / 2 for k in vec},
                      {k: means[k] - vec[k] / 2 for k in vec}, "mean_diff", ("a", "b"))  # fmt: skip
    rand = ds.random_like(8, seed=11)
    assert len(rand) == 8 and all(r.method == "random" for r in rand)
    again = ds.random_like(8, seed=11)
    for r, r2 in zip(rand, again, strict=True):
        for k in ds.layers:
            np.testing.assert_array_equal(r.vectors[k], r2.vectors[k])
            assert r.norms()[k] == pytest.approx(ds.norms()[k], rel=1e-5)
            np.testing.assert_allclose(r.center(k), ds.center(k), atol=1e-5)
            assert abs(r.cosine(ds, k)) < 5 / np.sqrt(d)
    assert abs(rand[0].cosine(rand[1], 0)) < 5 / np.sqrt(d)
    assert not np.array_equal(ds.random_like(1, seed=12)[0].vectors[0], rand[0].vectors[0])


def test_cosine_matrix(dirset):
    names, m = cosine_matrix({"a": dirset, "neg": -dirset, "twice": dirset * 2}, 3)
    assert names == ["a", "neg", "twice"] and m.shape == (3, 3)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    np.testing.assert_allclose(m, m.T)
    assert m[0, 1] == pytest.approx(-1.0, abs=1e-6) and m[0, 2] == pytest.approx(1.0, abs=1e-6)


def test_save_writes_provenance_into_the_header(tmp_path, dirset):
    from mlx_interp.analysis.directions import read_header

    path = tmp_path / "d.safetensors"
    dirset.save(path, model="smollm2_135m", config_key="c0ffee", artifact_key="abc")
    header = read_header(path)
    assert header["model"] == "smollm2_135m" and header["config_key"] == "c0ffee"
    assert header["artifact_key"] == "abc" and header["layers"] == [3, 7]
    assert header["method"] == "pca" and header["contrast"] == ("red", "blue")
    assert header["d_model"] == dirset.vectors[3].shape[0]
    loaded = DirectionSet.load(path)
    assert loaded.meta["model"] == "smollm2_135m" and loaded.meta["artifact_key"] == "abc"
    loaded.save(tmp_path / "again.safetensors")  # provenance now in meta: kept on re-save
    assert read_header(tmp_path / "again.safetensors")["config_key"] == "c0ffee"
    with pytest.raises(DirectionError, match="unknown provenance"):
        dirset.save(path, modle="typo")


def test_load_reads_files_written_before_provenance(tmp_path, dirset):
    """The first file format: no d_model and no provenance keys in the header."""
    from safetensors.numpy import save_file

    tensors = {}
    for prefix, arrays in (
        ("direction", dirset.vectors),
        ("pos_mean", dirset.pos_means),
        ("neg_mean", dirset.neg_means),
    ):
        tensors.update({f"{prefix}.{k}": v for k, v in arrays.items()})
    old_header = {
        "format": "mlx-interp.directions/1",
        "method": "pca",
        "contrast": json.dumps(["red", "blue"]),
        "layers": json.dumps([3, 7]),
        "meta": json.dumps({"n_pos": 5}),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old_header)
    loaded = DirectionSet.load(tmp_path / "old.safetensors")
    assert loaded.meta == {"n_pos": 5} and loaded.layers == [3, 7]
    np.testing.assert_array_equal(loaded.vectors[7], dirset.vectors[7])
