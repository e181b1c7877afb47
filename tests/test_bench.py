"""Fast checks of the benchmark helpers and its table (bench/); the benchmark is `make bench`."""

from __future__ import annotations

import json

import pytest

from bench.run import figures, print_table
from bench.stats import best_of, interleaved, ratio, repeated_dataset


def test_best_of_takes_the_fastest_call_after_a_warm_up():
    calls = []
    durations = iter([5.0, 3.0, 1.0, 2.0])  # warm-up, then three timed calls

    def fn():
        calls.append(next(durations))

    assert best_of(fn, repeat=3) >= 0  # wall time of a no-op call
    assert len(calls) == 4


def test_best_of_stops_at_the_budget():
    calls = []
    assert best_of(lambda: calls.append(1), repeat=100, budget_s=0.0) >= 0
    assert len(calls) == 2  # warm-up and one timed call


def test_interleaved_calls_in_turn():
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert set(times) == {"a", "b"}


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None


def test_repeated_dataset_keeps_rows_and_makes_ids_unique(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n')
    rows = [json.loads(line) for line in repeated_dataset(src, 3, tmp_path / "o.jsonl").open()]
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert [r["text"] for r in rows] == ["x", "y"] * 3


def _fake_results() -> dict:
    run = {"forward_tokens_per_s": 100.0, "matmul_gflops": 10.0}
    return {
        "forward": {
            "fast": {
                **run,
                "forward_tokens_per_s": 400.0,
                "capture_tokens_per_s": 390.0,
                "matmul_gflops": 400.0,
            },
            "reference": {**run, "forward_tokens_per_s": 20.0},
            "quantized": {**run, "forward_tokens_per_s": 20.0},
            "ref_quant": {**run, "forward_tokens_per_s": 16.0},
        },
        "generate": {
            "tokens": {"bare": 64},
            "tokens_per_s": {"bare": 20.0, "steered": 19.8, "steer_stream": 19.0},
        },
        "parquet": {
            dt: {"ratio": 0.5, "parquet_mb_s": 500.0, "npsave_mb_s": 1000.0, "list_ratio": 0.1}
            for dt in ("float32", "float16")
        },
        "experiment": {
            "reduced": "steer.n_random=2",
            "first_run_s": 60.0,
            "cached_rerun_s": 6.0,
            "unfixed_run_s": 600.0,
        },
        "memory": {
            "x1": {
                "prompts": 160,
                "peak_rss_mb": 1000.0,
                "capture_stage": {"seconds": 10.0, "write_seconds": 0.1, "write_share": 0.01},
            },
            "x10": {
                "prompts": 1600,
                "peak_rss_mb": 1050.0,
                "capture_stage": {"seconds": 90.0, "write_seconds": 0.9, "write_share": 0.01},
            },
        },
        "batch_shape": "8x128",
        "batch": {
            "tokens_per_s": {"capture": 300.0, "bare": 310.0, "compiled_body": 305.0},
            "transformers_skipped": "torch/transformers not installed (torch)",
            "op_ms": {
                "mlx_silu_gate": 24.0,
                "numpy_silu_gate": 3.0,
                "mlx_softmax": 14.0,
                "numpy_softmax": 2.0,
            },
        },
    }


def test_figures_are_the_ratios_of_the_raw_timings(capsys):
    rows = {name: value for name, value, _, _ in figures(_fake_results())}
    assert rows["capture all layers (last token) time / bare forward time"] == pytest.approx(
        400 / 390
    )
    assert rows["prefill tokens/s, both fixes / neither"] == pytest.approx(25.0)
    assert rows["experiment wall time without the fixes / with them"] == pytest.approx(10.0)
    assert rows["peak RSS, capture of 10x the prompts / 1x"] == pytest.approx(1.05)
    assert rows["Parquet writing share of the capture stage's wall time"] == pytest.approx(0.01)
    assert rows["MLX capture / transformers output_hidden_states"] is None  # skipped
    print_table(figures(_fake_results()))
    out = capsys.readouterr().out
    assert "skipped" in out and "pip install -e '.[bench]'" in out


def test_import_order_figures():
    order = {
        "mlx_interp_first_gflops": 30.0,
        "mlx_first_refused": True,
        "mlx_first_message": "BlasOrderError: ...",
        "mlx_first_accepted_gflops": 3.0,
    }
    rows = {name: value for name, value, _, _ in figures({"import_order": order})}
    assert rows == {
        "matmul GFLOP/s, mlx_interp imported first / mlx first (MLX_INTERP_BLAS=none)": 10.0,
        "mlx imported first without MLX_INTERP_BLAS=none: refused with the fix (1 = yes)": 1.0,
    }


def test_figures_of_a_partial_run():
    assert figures({}) == []
    only = {"parquet": _fake_results()["parquet"]}
    assert len(figures(only)) == 2


@pytest.mark.slow
def test_bench_parquet_section_runs():
    from bench.parquet import parquet_vs_npsave

    res = parquet_vs_npsave(n=20, layers=3, d_model=16)
    assert res["float32"]["ratio"] > 0 and res["float16"]["parquet_mb_s"] > 0


def test_stage_figures_from_a_run_log(tmp_path):
    from bench import stages
    from bench.stats import ratio as divide

    run = tmp_path / "run"
    run.mkdir()
    (run / "mlx_interp.log").write_text(
        "[x][mlx_interp.engine.dag][INFO] - stage capture    computed in 12.0s  /a\n"
        "[x][mlx_interp.engine.dag][INFO] - stage baseline   computed in 15.0s  /b\n"
        "[x][mlx_interp.engine.dag][INFO] - stage steer      computed in 9.0s  /c\n"
        "[x][mlx_interp.engine.dag][INFO] - stage report     cached\n"
    )
    times = stages.stage_seconds(run)
    assert times == {"capture": 12.0, "baseline": 15.0, "steer": 9.0}
    slow = {"capture": 15.0, "baseline": 15.0, "steer": 12.0}  # a round on a busier moment
    fast = {"capture": 10.0, "baseline": 20.0, "steer": 5.0}
    rounds = [
        {"wall_s": 48.0, "stages": times},
        {"wall_s": 90.0, "stages": slow},
        {"wall_s": 30.0, "stages": fast},
    ]
    res = {
        "stages": {
            "rounds": rounds,
            "sweep": {"wall_s": 36.0, "alphas": "2.0,2.5,3.0"},
            "all": {"wall_s": 200.0, "stages": {"steer": 130.0}},
            "all_sweep": {"wall_s": 270.0, "alphas": "2.0,2.5,3.0"},
        },
        "load": {"first_s": 4.0, "second_s": 0.8, "off_s": 4.1},
    }
    rows = {name: value for name, value, _, _ in stages.figures(res, divide)}
    # the median of the per-round ratios (0.75, 0.8, 0.5), not a ratio of medians (9 / 12)
    assert rows["steer stage / capture stage (default experiment, positions last)"] == 0.75
    assert rows["baseline stage / capture stage"] == 1.25  # of 1.25, 1.0, 2.0
    assert rows["whole default run (fresh store, set up) / capture stage"] == 4.0  # 4, 6, 3
    sweep = "3-alpha sweep (2.0,2.5,3.0) after the default run / capture stage"
    assert rows[sweep] == 3.0  # against the rounds' median capture, 12 s
    assert rows["second model load of SmolLM2, seconds (model load cache)"] == 0.8
    assert stages.figures({}, divide) == []
