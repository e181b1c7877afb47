"""Sides of prompts read by a probe, and the edit toward the other class (planted data)."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_interp.analysis.directions import extract
from mlx_interp.analysis.settings import edits_for, keep_heads, top_heads
from mlx_interp.analysis.sides import (
    AxisSide,
    SideError,
    SideProbe,
    load_side,
    side_labels,
    toward_other,
)
from mlx_interp.interventions.modes import AddMode, ReflectMode
from mlx_interp.interventions.sites import SiteEdit
from mlx_interp.interventions.steering import LayerEdit

D = 16


def _planted(n=40, seed=0):
    """pos rows at +5 e0, neg rows at -5 e0, other rows at +5 e1, unit noise."""
    rng = np.random.default_rng(seed)
    centres = {"pos": 5 * np.eye(D)[0], "neg": -5 * np.eye(D)[0], "other": 5 * np.eye(D)[1]}
    labels = np.repeat(list(centres), n)
    x = np.stack([centres[s] for s in labels]) + rng.standard_normal((len(labels), D))
    return x, labels


def test_probe_reads_planted_sides_and_survives_a_round_trip(tmp_path):
    x, labels = _planted()
    probe = SideProbe(C=1.0).fit(x, labels)
    test_x, test_labels = _planted(seed=1)
    assert (probe.predict(test_x) == test_labels).mean() > 0.95
    assert (probe.predict(test_x) == probe._model.predict(test_x)).all()  # = scikit-learn's
    probe.save(tmp_path / "gate.safetensors")
    again = SideProbe.load(tmp_path / "gate.safetensors")
    assert (again.predict(test_x) == probe.predict(test_x)).all()
    assert again.classes == ["neg", "other", "pos"]
    two = SideProbe().fit(x[labels != "other"], labels[labels != "other"])  # binary case
    assert set(two.predict(test_x[test_labels != "other"])) == {"pos", "neg"}


def test_probe_refuses_what_it_cannot_fit_or_read():
    x, labels = _planted()
    with pytest.raises(SideError, match="at least 2 'neg'"):
        SideProbe().fit(x[labels != "neg"], labels[labels != "neg"])
    with pytest.raises(SideError, match="among"):
        SideProbe().fit(x, np.where(labels == "pos", "up", labels))
    with pytest.raises(SideError, match="width"):
        SideProbe().fit(x, labels).predict(x[:, :4])
    with pytest.raises(SideError, match="not fitted"):
        SideProbe().predict(x)


def test_side_labels_and_the_edit_toward_the_other_class():
    assert side_labels(np.array(["r", "g", "c"]), "r", "g").tolist() == ["pos", "neg", "other"]
    x, labels = _planted()
    keep = labels != "other"
    ds = extract({0: x[keep]}, labels[keep] == "pos", labels[keep] == "neg", "mean_diff")
    vector, center = toward_other(ds, 0, "neg")
    assert np.allclose(vector, ds.vectors[0]) and np.allclose(center, ds.pos_means[0])
    vector, center = toward_other(ds, 0, "pos")
    assert np.allclose(vector, -ds.vectors[0]) and np.allclose(center, ds.neg_means[0])
    with pytest.raises(SideError):
        toward_other(ds, 0, "other")
    # reflecting a neg row about the pos mean with alpha 0.5 puts it at the pos mean's
    # coordinate along the direction; add moves it by +vector
    import mlx.core as mx

    h = mx.array(ds.neg_means[0][None, None, :])
    vector, center = toward_other(ds, 0, "neg")
    moved = np.array(ReflectMode()(h, mx.array(vector), mx.array(center), 0.5))[0, 0]
    assert np.isclose(moved @ ds.unit(0), ds.pos_means[0] @ ds.unit(0), atol=1e-4)
    added = np.array(AddMode()(h, mx.array(vector), None, 1.0))[0, 0]
    assert np.allclose(added, ds.pos_means[0], atol=1e-4)


def test_edits_for_each_site_kind_and_heads():
    rng = np.random.default_rng(0)
    acts = {2: rng.standard_normal((20, 8)) + np.r_[np.ones(10), -np.ones(10)][:, None]}
    ds = extract(acts, np.arange(20) < 10, np.arange(20) >= 10, "mean_diff")
    (resid,) = edits_for(ds, [2], "resid")
    assert isinstance(resid, LayerEdit) and np.allclose(resid.center, ds.center(2))
    (site,) = edits_for(ds, [2], "attn", side="pos")
    assert isinstance(site, SiteEdit) and site.site.name == "layers.2.attn"
    assert np.allclose(site.vector, -ds.vectors[2])
    kept = keep_heads(ds, [1, 3], n_heads=4)
    v = kept.vectors[2].reshape(4, 2)
    assert (v[[0, 2]] == 0).all() and np.allclose(v[[1, 3]], ds.vectors[2].reshape(4, 2)[[1, 3]])
    assert top_heads(np.array([0.1, 3.0, 0.2, 2.0]), 2) == (1, 3)


def test_axis_side_reads_along_a_given_axis(tmp_path):
    x, labels = _planted()
    axis = np.eye(D)[0] * 2.0  # the planted class axis, not fitted
    side = AxisSide(axis).fit(x + 1.0, labels)  # an offset: the threshold follows the classes
    assert np.isclose(side.threshold, 2.0, atol=0.5)
    test_x, test_labels = _planted(seed=1)
    two = test_labels != "other"
    assert (side.predict(test_x + 1.0)[two] == test_labels[two]).mean() > 0.95
    side.save(tmp_path / "axis.safetensors")
    again = load_side(tmp_path / "axis.safetensors")
    assert isinstance(again, AxisSide) and again.threshold == side.threshold
    assert isinstance(load_side(_saved_probe(tmp_path)), SideProbe)


def _saved_probe(tmp_path):
    x, labels = _planted()
    SideProbe().fit(x, labels).save(tmp_path / "probe.safetensors")
    return tmp_path / "probe.safetensors"


def test_axis_side_reads_other_where_the_classes_are_implausible(tmp_path):
    x, labels = _planted()
    plausible = lambda rows: -np.asarray(rows)[:, 1]  # noqa: E731  (others sit at +5 e1)
    side = AxisSide(np.eye(D)[0], plausible=plausible).fit(x, labels)
    test_x, test_labels = _planted(seed=1)
    assert (side.predict(test_x) == test_labels).mean() > 0.95  # other rows read as other
    side.save(tmp_path / "lens.safetensors")
    with pytest.raises(SideError, match="plausible"):
        load_side(tmp_path / "lens.safetensors").predict(test_x)
    again = load_side(tmp_path / "lens.safetensors", plausible=plausible)
    assert (again.predict(test_x) == side.predict(test_x)).all()
    with pytest.raises(SideError, match="neither class"):
        AxisSide(np.eye(D)[0], plausible=plausible).fit(
            x[labels != "other"], labels[labels != "other"]
        )
