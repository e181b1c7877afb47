"""Probe maths on synthetic activations with planted answers."""

import math

import numpy as np
import pytest
from scipy import stats as st

from mlx_interp.analysis.probes import (
    LogisticProbe,
    ProbeError,
    ProbeResult,
    best_layer,
    cross_validate_layer,
    permutation_threshold,
    probe_layers,
    transfer_scores,
)

N_PERM = 50
D = 8


def two_classes(n_per_class=40, shift=3.0, seed=0):
    """x [2n, D] with labels "a"/"b"; class "b" is moved by ``shift`` along a planted axis."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n_per_class, D))
    y = np.array(["a"] * n_per_class + ["b"] * n_per_class)
    x[y == "b", 0] += shift
    return x, y


@pytest.fixture(scope="module")
def signal_and_noise():
    x, y = two_classes(shift=5.0)
    noise = np.random.default_rng(1).normal(size=x.shape)
    acts = {7: x, 3: noise}
    return probe_layers(acts, y, k=5, seed=0, n_permutations=N_PERM), y


def test_signal_layer_found_and_significant(signal_and_noise):
    results, y = signal_and_noise
    assert [r.layer for r in results] == [3, 7]
    by_layer = {r.layer: r for r in results}
    sig, noise = by_layer[7], by_layer[3]
    assert sig.accuracy_mean > 0.9
    assert sig.permutation_p <= 2 / (N_PERM + 1)
    assert sig.n_permutations == N_PERM
    assert 0.3 <= noise.accuracy_mean <= 0.7
    assert noise.permutation_p > 0.05
    assert best_layer(results) == 7
    assert sig.classes == ("a", "b") and sig.n_per_class == {"a": 40, "b": 40}
    assert len(sig.fold_scores) == 5
    assert sig.accuracy_mean == pytest.approx(np.mean(sig.fold_scores))
    assert sig.accuracy_sd == pytest.approx(np.std(sig.fold_scores, ddof=1))


def test_best_layer_ties_go_to_lower_layer():
    def result(layer, acc):
        return ProbeResult(layer, ("a", "b"), {"a": 5, "b": 5}, acc, 0.0, (acc,), math.nan, 0)

    assert best_layer([result(9, 0.8), result(4, 0.8), result(6, 0.7)]) == 4
    with pytest.raises(ProbeError, match="no probe results"):
        best_layer([])


def test_same_seed_same_numbers_other_seed_differs():
    x, y = two_classes(n_per_class=30, shift=1.0)
    first = cross_validate_layer(x, y, seed=3, n_permutations=10)
    again = cross_validate_layer(x, y, seed=3, n_permutations=10)
    other = cross_validate_layer(x, y, seed=4, n_permutations=0)
    assert first == again
    assert other.fold_scores != first.fold_scores
    assert math.isnan(other.permutation_p) and other.n_permutations == 0


def test_too_few_examples_for_folds_names_class_and_folds():
    x, y = two_classes(n_per_class=10)
    keep = np.r_[np.arange(10), 10, 11, 12]  # all of "a", 3 of "b"
    with pytest.raises(ProbeError, match=r"class 'b' has 3 examples, fewer than the 5 CV folds"):
        cross_validate_layer(x[keep], y[keep], k=5, n_permutations=0)


def test_one_class_and_nan_are_errors():
    x, y = two_classes(n_per_class=10)
    with pytest.raises(ProbeError, match="only one class"):
        cross_validate_layer(x[:10], y[:10], n_permutations=0)
    x[4, 2] = np.nan
    with pytest.raises(ProbeError, match="NaN/inf in 1 row"):
        cross_validate_layer(x, y, n_permutations=0)
    with pytest.raises(ProbeError, match="one per row"):
        cross_validate_layer(np.zeros((20, D)), y[:19], n_permutations=0)


def test_permutation_threshold_is_binomial_quantile():
    threshold = permutation_threshold({"a": 50, "b": 50}, alpha=0.05)
    assert threshold == pytest.approx(st.binom.ppf(0.95, 100, 0.5) / 100)
    assert 0.58 <= threshold <= 0.59
    assert permutation_threshold({"a": 70, "b": 30}) == pytest.approx(
        st.binom.ppf(0.95, 100, 0.7) / 100
    )
    sizes = [20, 100, 400, 2000]
    values = [permutation_threshold({"a": n // 2, "b": n // 2}) for n in sizes]
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True))
    assert values[-1] > 0.5
    with pytest.raises(ProbeError, match="alpha"):
        permutation_threshold({"a": 5, "b": 5}, alpha=1.5)


def test_transfer_scores_follow_the_planted_direction():
    rng = np.random.default_rng(5)
    axis = rng.normal(size=D)
    axis /= np.linalg.norm(axis)

    def around(center, n):
        return rng.normal(size=(n, D)) * 0.5 + center * axis

    x = np.vstack([around(2.0, 60), around(-2.0, 60)])
    y = ["pressure"] * 60 + ["neutral"] * 60
    others = {
        "pressure_like": around(2.0, 50),
        "neutral_like": around(-2.0, 50),
        "halfway": around(0.0, 200),
    }
    scores = transfer_scores(x, y, "pressure", others, seed=0)
    assert set(scores) == set(others)
    assert scores["pressure_like"] > 0.9
    assert scores["neutral_like"] < 0.1
    assert 0.3 <= scores["halfway"] <= 0.7
    assert transfer_scores(x, y, "pressure", others, seed=0, probe=LogisticProbe(C=0.5)) == (
        transfer_scores(x, y, "pressure", others, seed=0, probe=LogisticProbe(C=0.5))
    )


def test_transfer_scores_errors():
    x, y = two_classes(n_per_class=10)
    with pytest.raises(ProbeError, match="'pressure' is not among"):
        transfer_scores(x, y, "pressure", {})
    with pytest.raises(ProbeError, match="every training row"):
        transfer_scores(x[:10], y[:10], "a", {})
    with pytest.raises(ProbeError, match="d=3 but training has d=8"):
        transfer_scores(x, y, "a", {"held": np.zeros((4, 3))})


def test_logistic_probe_factory():
    est = LogisticProbe(C=0.3, max_iter=50).make(7)
    clf = est[-1]
    assert (clf.C, clf.max_iter, clf.random_state) == (0.3, 50, 7)
    assert type(est[0]).__name__ == "StandardScaler"
