"""Attribution patching against numerical derivatives of plain patched forwards: the change
of the metric when a site moves a small step from its corrupted value toward its clean one."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_interp.analysis.attribution import attribution_patching
from mlx_interp.interventions.patching import patching_heatmaps
from tests.patch_reference import metric_with_values, reference_values
from tests.tiny_models import tiny_model

PLUS, MINUS, WIDTH = 1, 2, 8
SITES = [  # (kind, layer, position, head)
    ("resid_pre", 0, 3, None),
    ("resid_pre", 2, 7, None),
    ("resid_post", 2, 7, None),
    ("resid_post", 1, 5, None),
    ("attn_out", 1, 7, None),
    ("mlp_out", 0, 3, None),
    ("mlp_out", 2, 6, None),
    ("z", 2, 7, 1),
    ("z", 1, 4, 3),
]


def _pairs():
    rng = np.random.default_rng(7)
    clean = rng.integers(5, 120, (2, WIDTH))
    corrupt = clean.copy()
    corrupt[:, 3] = (clean[:, 3] + 5) % 120
    return clean, corrupt


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_attribution_is_the_derivative_along_clean_minus_corrupted(arch):
    model = tiny_model(arch, seed=4)
    clean, corrupt = _pairs()
    kinds = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")
    got = attribution_patching(model, clean, corrupt, kinds, answers=(PLUS, MINUS))
    step = 1e-2
    for kind, layer, position, head in SITES:
        c = reference_values(model, clean, kind, layer)
        x = reference_values(model, corrupt, kind, layer)
        mask = np.zeros((2, WIDTH), bool)
        mask[:, position] = True
        ends = [
            metric_with_values(
                model, corrupt, kind, layer, mask, head, x + s * (c - x), PLUS, MINUS
            )
            for s in (step, -step)
        ]
        want = (ends[0] - ends[1]) / (2 * step)  # d metric / d s at s = 0
        result = got[kind]
        index = (layer, position) if head is None else (layer, position, head)
        estimate = result.metric[index] - result.corrupted_metric
        assert estimate == pytest.approx(want, rel=2e-2, abs=2e-3), (kind, layer, position)
    assert got["z"].recovery.shape == (3, WIDTH, 4)
    assert got["resid_pre"].recovery.shape == (3, WIDTH)
    np.testing.assert_allclose(got["resid_pre"].recovery[:, :3], 0.0, atol=1e-6)


def test_attribution_tracks_real_patching_on_a_tiny_model():
    """On a small random model the first-order estimate is close to the real patch."""
    model = tiny_model("llama", seed=1)
    clean, corrupt = _pairs()
    kinds = ("resid_pre", "attn_out", "z")
    real = patching_heatmaps(model, clean, corrupt, kinds, answers=(PLUS, MINUS))
    est = attribution_patching(model, clean, corrupt, kinds, answers=(PLUS, MINUS))
    for kind in kinds:
        r = np.corrcoef(real[kind].recovery.ravel(), est[kind].recovery.ravel())[0, 1]
        assert r > 0.9, kind
    assert est["resid_pre"].clean_metric == pytest.approx(real["resid_pre"].clean_metric, 1e-4)
