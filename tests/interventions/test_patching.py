"""Fast activation patching against plain full forwards with the same patch, written here by
hand (class swaps on a model run without any cache), on tiny models of every architecture."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_interp.interventions.patch_batches import Patch, record_pairs, run_patches
from mlx_interp.interventions.patching import (
    PatchingError,
    logit_diff,
    patching_heatmap,
    patching_heatmaps,
)
from mlx_interp.interventions.resume import resumed_logits
from mlx_interp.interventions.sites import head_shape
from tests.patch_reference import plain_patched_logits, reference_metric, reference_values
from tests.tiny_models import ARCHS, tiny_model

WIDTH, PLUS, MINUS = 10, 1, 2


def _pairs(seed: int, n_pairs: int = 2):
    """Pairs that share 3 tokens, then differ at positions 3 and 6."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(5, 120, (n_pairs, WIDTH))
    corrupt = clean.copy()
    corrupt[:, 3] = (clean[:, 3] + 7) % 120
    corrupt[:, 6] = (clean[:, 6] + 11) % 120
    return clean, corrupt


def _patches(n_pairs, model):
    n_layers, n_heads = len(model.layers), head_shape(model, 0)[0]
    out = []
    for kind, layer, positions, head in [
        ("resid_pre", 0, [3], None),
        ("resid_pre", 1, [6], None),
        ("resid_pre", 2, [4, 8], None),
        ("resid_post", n_layers - 1, [WIDTH - 1], None),
        ("resid_post", 0, [3, 6], None),
        ("attn_out", 1, [6], None),
        ("attn_out", 2, [WIDTH - 1], None),
        ("mlp_out", 0, [3], None),
        ("mlp_out", 2, [7], None),
        ("z", 1, [6], n_heads - 1),
        ("z", 2, [8, 9], 0),
        ("z", 0, [3], None),
    ]:
        mask = np.zeros((n_pairs, WIDTH), bool)
        mask[:, positions] = True
        out.append(Patch(kind, layer, mask, head))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_patching_equals_a_full_forward_with_the_same_patch(arch):
    model = tiny_model(arch, seed=11)
    clean, corrupt = _pairs(1)
    patches = _patches(len(clean), model)
    runs = record_pairs(
        model, mx.array(clean), mx.array(corrupt), [WIDTH - 1] * 2, ("attn_out", "mlp_out", "z")
    )
    metric = logit_diff(PLUS, MINUS)
    for budget in (4096, 24):  # one forward per layer; many forwards resumed at later positions
        got = run_patches(model, runs, patches, metric, max_row_tokens=budget)
        want = [reference_metric(model, clean, corrupt, p, PLUS, MINUS) for p in patches]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_wrong_cache_is_caught_by_the_reference():
    """Planted bug: resuming with the clean run's keys/values for the earlier positions."""
    model = tiny_model("llama", seed=11)
    clean, corrupt = _pairs(1)
    patch = Patch("resid_pre", 1, np.eye(1, WIDTH, 8, dtype=bool).repeat(2, 0))
    runs = record_pairs(model, mx.array(clean), mx.array(corrupt), [WIDTH - 1] * 2, ())
    want = reference_metric(model, clean, corrupt, patch, PLUS, MINUS)
    metric = logit_diff(PLUS, MINUS)
    assert run_patches(model, runs, [patch], metric)[0] == pytest.approx(want, abs=1e-4)
    runs.corrupt.keys, runs.corrupt.values = runs.clean.keys, runs.clean.values
    assert run_patches(model, runs, [patch], metric)[0] != pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_resuming_without_a_patch_gives_the_corrupted_logits(arch):
    """Patching nothing recovers 0: the corrupted states resumed at every layer and position
    reproduce the corrupted run's own logits."""
    model = tiny_model(arch, seed=3)
    clean, corrupt = _pairs(2)
    runs = record_pairs(model, mx.array(clean), mx.array(corrupt), [WIDTH - 1] * 2, ())
    pair = mx.array([0, 1])
    for start in range(len(model.layers) + 1):
        for a in (0, 4, WIDTH - 1):
            h = runs.corrupt.resid[start][pair, a:]
            logits = resumed_logits(model, runs.corrupt, start, a, pair, h, [WIDTH - 1] * 2)
            np.testing.assert_allclose(
                np.array(logits), np.array(runs.corrupt.logits), rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_heatmap_recovers_one_at_the_last_residual_and_at_the_only_differing_embedding(arch):
    model = tiny_model(arch, seed=5)
    clean, corrupt = _pairs(4)
    corrupt[:, 6] = clean[:, 6]  # one differing token, at position 3
    res = patching_heatmaps(model, clean, corrupt, ("resid_pre", "resid_post"), answers=(1, 2))
    pre, post = res["resid_pre"].recovery, res["resid_post"].recovery
    assert pre.shape == post.shape == (len(model.layers), WIDTH)
    assert post[-1, -1] == pytest.approx(1.0, abs=1e-5)
    assert pre[0, 3] == pytest.approx(1.0, abs=1e-5)  # the whole difference enters there
    np.testing.assert_allclose(pre[:, :3], 0.0, atol=0)  # before any difference: nothing
    np.testing.assert_allclose(post[-1, :-1], 0.0, atol=1e-5)  # too late to reach the last
    assert res["resid_pre"].clean_metric != res["resid_pre"].corrupted_metric


def test_positions_before_the_first_difference_computed_or_skipped_agree(monkeypatch):
    """skip_unchanged=False runs forwards for the positions before the first difference (the
    forwards counted); their values equal the corrupted metric that skipping writes."""
    import mlx_interp.interventions.patch_batches as pb

    model = tiny_model("llama", seed=5)
    clean, corrupt = _pairs(4)
    calls = []
    forward = pb._forward
    monkeypatch.setattr(pb, "_forward", lambda *a: calls.append(a[4]) or forward(*a))
    skipped = patching_heatmap(model, clean, corrupt, answers=(1, 2)).recovery
    assert min(calls) == 3  # nothing resumed before the first differing position
    calls.clear()
    every = patching_heatmap(model, clean, corrupt, answers=(1, 2), skip_unchanged=False)
    assert min(calls) == 0
    np.testing.assert_allclose(every.recovery, skipped, atol=1e-5)


def test_blas_threads_restores_the_count():
    from mlx_interp.blas import _thread_calls, blas_threads

    calls = _thread_calls()
    before = calls[0]() if calls else None
    with blas_threads(1):
        if calls:
            assert calls[0]() == 1
    assert (calls[0]() if calls else None) == before


def test_head_heatmap_shape_layers_positions_and_errors():
    model = tiny_model("mistral", seed=2)
    clean, corrupt = _pairs(3)
    z = patching_heatmap(model, clean, corrupt, "z", answers=(1, 2), layers=[-1], positions=[-1])
    assert z.recovery.shape == (1, 1, head_shape(model, 0)[0])
    assert z.layers == [len(model.layers) - 1] and z.positions == [WIDTH - 1]
    whole = patching_heatmap(model, clean, corrupt, "attn", answers=(1, 2))
    # heads add up to the attention output only through the output projection: not checked;
    # the named kind is the attention output's
    assert whole.kind == "attn_out"
    with pytest.raises(PatchingError, match="one length"):
        patching_heatmap(model, clean[:, :-1], corrupt, answers=(1, 2))
    with pytest.raises(PatchingError, match="nothing to recover"):
        patching_heatmap(model, clean, clean, answers=(1, 2))
    with pytest.raises(PatchingError, match="cannot patch"):
        patching_heatmap(model, clean, corrupt, "pattern", answers=(1, 2))


@pytest.mark.slow
def test_ioi_on_smollm2_patching_attribution_lens_and_dla(smollm2_float):
    """SmolLM2 (float32, as the pipeline runs it on the CPU) on name-mover prompts: the fast
    heatmap against plain forwards, the last residual recovering 1, attribution tracking real
    patching on the attention outputs and heads, the lens's last layer = the logits, DLA
    adding up."""
    from mlx_interp.analysis.attribution import attribution_patching
    from mlx_interp.analysis.dla import direct_logit_attribution
    from mlx_interp.analysis.lens import logit_lens

    model, tokenizer = smollm2_float
    template = "When {} and {} went to the store, {} gave the bag to"
    names = [("John", "Mary"), ("Tom", "Anna"), ("James", "Sarah")]
    clean = [tokenizer.encode(template.format(a, b, b)) for a, b in names]
    corrupt = [tokenizer.encode(template.format(a, b, a)) for a, b in names]
    ids = [[tokenizer.encode(" " + n, add_special_tokens=False)[0] for n in p] for p in names]
    answers = ([i[0] for i in ids], [i[1] for i in ids])
    kinds = ("resid_pre", "resid_post", "attn_out")
    real = patching_heatmaps(model, clean, corrupt, kinds, answers=answers)
    late = list(range(18, 30))  # heads where the name movers are (all layers: 10x the time)
    real["z"] = patching_heatmap(model, clean, corrupt, "z", answers=answers, layers=late)
    assert real["resid_post"].recovery[-1, -1] == pytest.approx(1.0, abs=1e-4)
    s2 = next(i for i, (a, b) in enumerate(zip(clean[0], corrupt[0], strict=True)) if a != b)
    assert real["resid_pre"].recovery[0, s2] == pytest.approx(1.0, abs=1e-4)  # the S2 name
    np.testing.assert_array_equal(real["resid_pre"].recovery[:, :s2], 0.0)
    width, metric = len(clean[0]), logit_diff(*answers)
    for kind, layer, position in (("resid_pre", 14, s2), ("attn_out", 20, -1), ("z", 23, -1)):
        position %= width
        mask = np.zeros((len(clean), width), bool)
        mask[:, position] = True
        head = 3 if kind == "z" else None
        source = reference_values(model, clean, kind, layer)
        row = real[kind].layers.index(layer)
        got = real[kind].metric[(row, position, head) if head is not None else (row, position)]
        logits = plain_patched_logits(model, corrupt, kind, layer, mask, head, source)
        assert got == pytest.approx(float(mx.mean(metric(logits)).item()), abs=2e-3)
    est = attribution_patching(model, clean, corrupt, (*kinds, "z"), answers=answers)
    for kind, floor in (("attn_out", 0.8), ("z", 0.8)):
        rows = real[kind].layers
        r = np.corrcoef(real[kind].recovery.ravel(), est[kind].recovery[rows].ravel())[0, 1]
        assert r > floor, (kind, r)
    lens = logit_lens(model, clean, layers=[-1], positions=[-1])
    logits = np.array(model(mx.array(clean))[:, -1].astype(mx.float32))
    np.testing.assert_allclose(lens[:, 0, 0], logits, rtol=1e-3, atol=1e-3)
    dla = direct_logit_attribution(model, clean, answers=answers)
    rows = np.arange(len(clean))
    own = logits[rows, answers[0]] - logits[rows, answers[1]]
    np.testing.assert_allclose(dla.logit_diff, own, atol=1e-3)
    np.testing.assert_allclose(dla.remainder, 0.0, atol=1e-3)
