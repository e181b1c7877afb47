"""Per-row edit vectors (CONTRACTS item 3): every mode takes ``vector``/``center`` of shape
``[d]`` or ``[batch, 1, d]``; row b of a per-row call equals a one-row call with row b's
vectors (norms and projections along the last axis only)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_interp.interventions.modes import (
    PLAIN_MODES,
    ConditionalMode,
    NormPreservingMode,
    make_mode,
)

D, BATCH, SEQ = 16, 3, 5


def _modes():
    rng = np.random.default_rng(7)
    modes = {name: make_mode(name) for name in PLAIN_MODES}
    modes["add_norm"] = NormPreservingMode("add")
    coef = rng.standard_normal(D).astype(np.float32)
    modes["conditional"] = ConditionalMode("reflect", coef=coef, intercept=0.1)
    return modes


@pytest.mark.parametrize("name", list(_modes()))
@pytest.mark.parametrize("alpha", [1.5, -0.7])
def test_per_row_vectors_equal_one_row_at_a_time(name, alpha):
    mode = _modes()[name]
    rng = np.random.default_rng(0)
    h = mx.array(rng.standard_normal((BATCH, SEQ, D)).astype(np.float32))
    vectors = rng.standard_normal((BATCH, D)).astype(np.float32) * [[1.0], [3.0], [0.2]]
    centers = rng.standard_normal((BATCH, D)).astype(np.float32)
    per_row = mode(h, mx.array(vectors[:, None, :]), mx.array(centers[:, None, :]), alpha)
    assert per_row.shape == h.shape and per_row.dtype == h.dtype
    for b in range(BATCH):
        one = mode(h[b : b + 1], mx.array(vectors[b]), mx.array(centers[b]), alpha)
        np.testing.assert_allclose(np.array(per_row[b]), np.array(one[0]), atol=1e-5, rtol=1e-5)
    # rows differ: the per-row call did not use one row's vector for all
    shared = mode(h, mx.array(vectors[0]), mx.array(centers[0]), alpha)
    assert not np.allclose(np.array(per_row[1:]), np.array(shared[1:]), atol=1e-4)
