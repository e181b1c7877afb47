"""``mlx-interp-reproduce``: a tiny-model run reproduces bit for bit; a change is reported."""

from __future__ import annotations

import json

from mlx_interp.apps.reproduce import PROVENANCE, compare_runs, main, numbers_differ


def test_a_tiny_run_reproduces_bit_for_bit_in_a_fresh_store(cli_run, workdir, capsys):
    code, err = cli_run("report.plots=false")
    assert code in (0, None), err[-2000:]
    run = workdir / "run"
    prov = json.loads((run / PROVENANCE).read_text())
    assert prov["seed"] == 42 and prov["packages"]["mlx"] and prov["blas"]["name"]
    assert prov["model"] == {"name": "tiny_random"}  # random weights: the config is the record
    capsys.readouterr()

    assert main([str(run), "--out", str(workdir / "again")]) == 0
    out = capsys.readouterr().out
    assert "identical:" in out, out
    fresh = json.loads((workdir / "again" / "run.json").read_text())
    assert not any(r["cached"] for r in fresh.values())  # recomputed, not read from the cache
    assert str(workdir / "again" / "artifacts_store") in fresh["capture"]["path"]

    assert main([str(run), "--out", str(workdir / "cached"), "--reuse-cache"]) == 0
    cached = json.loads((workdir / "cached" / "run.json").read_text())
    assert all(r["cached"] for r in cached.values())


def test_a_changed_number_or_file_is_reported(cli_run, workdir, capsys):
    code, _ = cli_run("report.plots=false")
    assert code in (0, None)
    run = workdir / "run"
    assert main([str(run), "--out", str(workdir / "twin")]) == 0
    report = json.loads((run / "report.json").read_text())
    report["swap"]["all"]["rate"] = report["swap"]["all"]["rate"] + 0.25
    (run / "report.json").write_text(json.dumps(report))
    diffs = compare_runs(run, workdir / "twin")
    assert any(d.startswith("report.json: swap.all.rate:") for d in diffs), diffs
    part = next((workdir / "twin" / "artifacts" / "capture" / "activations").glob("*.parquet"))
    part.chmod(0o644)
    part.write_bytes(part.read_bytes()[::-1])
    diffs = compare_runs(run, workdir / "twin")
    assert any("stage capture: the re-run's artifact fails its checksums" in d for d in diffs)


def test_not_a_run_folder_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a complete run folder" in err


def test_numbers_differ_is_exact_and_names_the_path():
    assert numbers_differ({"a": [1.0, float("nan")]}, {"a": [1.0, float("nan")]}) == []
    assert numbers_differ({"a": 3}, {"a": 3.0}) == []
    assert numbers_differ({"a": {"b": 0.1}}, {"a": {"b": 0.10000001}}) == [
        "a.b: 0.1 (original) vs 0.10000001 (re-run)"
    ]
    assert numbers_differ({"x": 1}, {}) == ["x: only in the original"]


def test_a_different_key_is_explained_not_counted_as_a_different_result(cli_run, workdir, capsys):
    """A run folder made before keys held the code's hash: its keys differ, and the tool says
    why; the results (every file, every number) are still compared and identical."""
    code, _ = cli_run("report.plots=false")
    assert code in (0, None)
    run = workdir / "run"
    recorded = json.loads((run / "run.json").read_text())
    manifest_path = run / "artifacts" / "steer" / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old = {**manifest, "record": {"upstream": manifest["record"]["upstream"]}}  # an old record
    manifest_path.write_text(json.dumps(old))
    recorded["steer"]["key"] = "0" * 64  # a key of the old scheme
    (run / "run.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main([str(run), "--out", str(workdir / "explained")]) == 0
    out = capsys.readouterr().out
    assert "note: stage steer: artifact key 000000000000 vs" in out
    assert "before artifact keys held the hash of the stage's code" in out
    assert "identical:" in out and "1 artifact key(s) differ, as noted" in out


def test_key_reasons_name_the_part_that_changed():
    from mlx_interp.apps.reproduce import key_reason

    base = {"code": {"a": "1", "b": "2"}, "config": {"steer": {"alpha": 1.0}}, "files": {}}
    record = {**base, "upstream": {"prompts": "k1"}}

    def manifest(**changes):
        return {"record": {**record, **changes}}

    assert "code changed (b)" in key_reason(manifest(), manifest(code={"a": "1", "b": "3"}))
    slice_ = {"steer": {"alpha": 2.0}}
    assert "config slice differs (steer.alpha" in key_reason(manifest(), manifest(config=slice_))
    assert "upstream key(s) differ (prompts)" in key_reason(
        manifest(), manifest(upstream={"prompts": "k2"})
    )
    assert "the files it names differ" in key_reason(manifest(), manifest(files={"x": "y"}))
