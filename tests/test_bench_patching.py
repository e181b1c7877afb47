"""The patching bench section's table from a synthetic result (the section itself is
`python bench/patching.py`: minutes of SmolLM2, TransformerLens and nnsight)."""

from __future__ import annotations

from bench.patching import figures, missing_extra


def _mlx() -> dict:
    return {
        "heatmap": [[0.0] * 14] * 30,
        "fast_s": 2.0,
        "fast_cpu_s": 3.0,
        "fast_s_runs": [2.0, 2.5],
        "every_position_s": 5.0,
        "every_position_max_diff": 0.0,
        "by_hand_s": 40.0,
        "by_hand_max_diff": 1e-6,
        "ioi_real_s": 100.0,
        "attribution_s": 3.0,
        "attribution_correlation": {"attn_out": 0.97, "z": 0.96},
        "n_pairs_attribution": 2,
    }


def test_table_has_ratios_and_says_why_a_peer_is_missing():
    peer = {"version": "1", "torch_threads": 2, "seconds": 10.0, "cpu_seconds": 15.0}
    peer |= {"max_abs_diff_vs_mlx": 1e-6, "time_ratio_vs_mlx": 5.0, "cpu_ratio_vs_mlx": 5.0}
    rows = figures({"mlx": _mlx(), "transformer_lens": peer, "nnsight": {"error": "boom"}})
    names = {name: (value, note) for name, value, _, note in rows}
    assert names["by hand (one full forward per patch) / mlx-interp heatmap time"][0] == 20.0
    assert names["TransformerLens 1 heatmap wall time / mlx-interp"][0] == 5.0
    assert names["nnsight heatmap time / mlx-interp"] == (None, "boom")
    one = "TransformerLens (torch on 1 thread) heatmap time / mlx-interp"
    assert names[one] == (None, "not run")
    rows = figures({"mlx": _mlx(), "skipped": "nnsight is not installed: pip install"})
    assert any(value is None and "not installed" in note for _, value, _, note in rows)
    assert figures({"mlx": {"error": "mlx failed: x"}}) == [
        ("patching heatmap", None, "", "mlx failed: x")
    ]
    assert missing_extra() in (None, "torch", "transformers", "transformer_lens", "nnsight")
