"""Issue 21's last cases of the bad-input catalogue: each is one clear error (one ``error:``
line naming the problem and the fix, exit 2, nothing computed before lost) or a documented
behaviour. Config cases run the real entry point in-process (``cli_run`` in conftest, whose
harness checks that no completed artifact changed); the rest are function-level.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_clear


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _rows(n: int = 4, conditions=("green", "red", "control"), **extra) -> list[dict]:
    return [
        {"id": f"{c}-{i}", "text": f"What colour is the {c} thing {i}?", "condition": c, **extra}
        for c in conditions
        for i in range(n)
    ]


# --- config values the validator did not check -----------------------------------------------


@pytest.mark.parametrize(
    "override,words",
    [
        ("model.tiny.num_layers=0", "model.tiny.num_layers must be an int >= 1"),
        ("model.tiny.hidden_size=-1", "model.tiny.hidden_size must be a positive multiple of 8"),
        ("model.tiny.hidden_size=12", "model.tiny.hidden_size must be a positive multiple of 8"),
        ("model.tiny.intermediate_size=0", "model.tiny.intermediate_size must be an int >= 1"),
        ("model.tiny.seed=-3", "model.tiny.seed must be an int >= 0"),
        ("pipeline.stages=[]", "pipeline.stages must be a non-empty list of stage names"),
        ("localize.max_pairs=-1", "localize.max_pairs must be an int >= 2"),
        ("localize.max_pairs=0", "localize.max_pairs must be an int >= 2"),
        ("concept.dataset=", "concept.dataset must be a path to a JSONL file"),
        ("concept.extra_datasets=['']", "concept.extra_datasets must be a list of paths"),
    ],
)
def test_config_values(cli_run, override, words):
    code, err = cli_run(override, "experiment=capture_only")
    assert_clear(code, err, words, "e.g.")


def test_a_valid_tiny_model_still_runs(cli_run):
    code, err = cli_run("experiment=capture_only", "model.tiny.hidden_size=16")
    assert code in (0, None), err[-2000:]


def test_max_pairs_keeps_every_pair_it_allows():
    """``localize.max_pairs`` caps the pairs; it never drops one below the cap."""
    import pandas as pd

    from mlx_interp.stages.localize import make_pairs

    rows = [("green", f"What colour is the {o}?", o) for o in ("cat", "dog", "sun")] + [
        ("red", f"What colour is the {o}?", o) for o in ("car", "box", "hat")
    ]
    prompts = pd.DataFrame(
        {
            "condition": [c for c, _, _ in rows],
            "text": [t for _, t, _ in rows],
            "meta": [json.dumps({"object": o}) for _, _, o in rows],
            "n_tokens": [7] * len(rows),
        }
    )
    assert len(make_pairs(prompts, "green", "red", 24)) == 3
    assert len(make_pairs(prompts, "green", "red", 2)) == 2


# --- score.controls naming a condition the dataset does not have ------------------------------


def test_controls_naming_a_missing_condition(cli_run):
    code, err = cli_run("score.controls=[nope]")
    assert_clear(code, err, "score.controls", "'nope'", "'control', 'green', 'red'")


# --- mlx-interp-reproduce compares what it claims ---------------------------------------------


def test_reproduce_sees_an_edited_report_md(cli_run, workdir, capsys):
    from mlx_interp.apps.reproduce import compare_runs, main

    code, err = cli_run("report.plots=false")
    assert code in (0, None), err[-2000:]
    run = workdir / "run"
    assert main([str(run), "--out", str(workdir / "twin21")]) == 0
    assert "report.md" in capsys.readouterr().out  # the claim names what was compared
    report = run / "report.md"
    report.write_text(report.read_text(encoding="utf-8") + "\nedited by hand\n", encoding="utf-8")
    diffs = compare_runs(run, workdir / "twin21")
    assert any(d.startswith("report.md:") and "differs" in d for d in diffs), diffs


# --- the library ----------------------------------------------------------------------------


def test_direction_save_into_a_missing_folder(tmp_path):
    from mlx_interp.analysis.directions import DirectionError, DirectionSet

    vec = {0: np.ones(4, dtype=np.float32)}
    dirset = DirectionSet(vec, vec, vec, "mean_diff", ("a", "b"), {})
    target = tmp_path / "no" / "such" / "folder" / "d.safetensors"
    with pytest.raises(DirectionError) as info:
        dirset.save(target)
    message = str(info.value)
    assert f"the folder {target.parent} does not exist" in message and "mkdir" in message
    assert not target.parent.exists()


def test_library_refuses_an_unusable_blas_like_the_cli(monkeypatch):
    import mlx_interp
    import mlx_interp.blas as blas
    from mlx_interp.errors import ConfigError

    monkeypatch.setattr(blas, "_INFO", None)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setenv(blas.ENV_VAR, "/missing.so")
    assert blas.ensure_fast_blas().name == "unusable"
    with pytest.raises(ConfigError, match="MLX_INTERP_BLAS='/missing.so' does not load"):
        mlx_interp.load("tiny_random")
    monkeypatch.setattr(blas, "_INFO", None)


# --- messages that blamed the wrong thing or lacked a location ---------------------------------


def test_a_folder_as_gguf_model_path(cli_run, workdir):
    folder = workdir / "models_folder"
    folder.mkdir(exist_ok=True)
    (folder / "mine.gguf").write_bytes(b"")
    code, err = cli_run("model=gguf", f"model.path={folder}", "experiment=capture_only")
    assert_clear(code, err, f"model.path={folder} is a folder", "mine.gguf")
    assert "not found" not in err


def test_a_folder_as_concept_dataset(cli_run, workdir):
    folder = workdir / "data_folder"
    folder.mkdir(exist_ok=True)
    _jsonl(folder / "rows.jsonl", _rows())
    code, err = cli_run(f"concept.dataset={folder}", "experiment=capture_only")
    assert_clear(code, err, f"concept.dataset {folder} is a folder", "rows.jsonl", "JSONL file")
    assert "not found" not in err


def test_a_row_without_object_names_its_id_file_and_line(cli_run, workdir):
    rows = _rows(object="thing")
    del rows[5]["object"]
    bad = _jsonl(workdir / "noobject.jsonl", rows)
    code, err = cli_run(f"concept.dataset={bad}", "experiment=capture_only")
    assert_clear(code, err, "noobject.jsonl, line 6", "'red-1'", "object")


def test_object_positions_on_a_dataset_without_objects_name_a_prompt(cli_run):
    code, err = cli_run("directions.site=object", "pipeline.stages=[directions]")
    assert_clear(code, err, "prompt 'green-0'", "`object`", "directions.site=last")


def test_every_row_in_the_test_split(cli_run, workdir):
    data = _jsonl(workdir / "alltest.jsonl", _rows(split="test"))
    code, err = cli_run(
        f"concept.dataset={data}", "directions.fit_split=train", "pipeline.stages=[directions]"
    )
    assert_clear(code, err, "every prompt is in split 'test'", "split: train", "fit_split=all")


def test_unquoted_non_ascii_value_gets_the_hint_to_quote_it(cli_run):
    code, err = cli_run("concept.instruction=Qué es {text}", "experiment=capture_only")
    assert_clear(code, err, "concept.instruction", "quote", "concept.instruction='Qué es {text}'")


def test_quoted_non_ascii_value_is_accepted(cli_run):
    code, err = cli_run("concept.instruction='Qué es {text}'", "experiment=capture_only")
    assert code in (0, None), err[-2000:]


def test_chat_model_that_names_nothing(capsys):
    from mlx_interp.apps.chat import main

    assert main(["--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not a model" in err and "tiny_random" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_chat_model_paths_still_map_to_overrides():
    from mlx_interp.apps.chat import model_overrides

    assert "model.path=/m/folder" in model_overrides("/m/folder")
    assert model_overrides("owner/name")[0] == "model=qwen2_5_7b_instruct_4bit"


if sys.platform != "linux":  # the BLAS cases are Linux-only (macOS uses Accelerate)
    test_library_refuses_an_unusable_blas_like_the_cli = pytest.mark.skip(  # noqa: F811
        reason="MLX_INTERP_BLAS is read on Linux only"
    )(test_library_refuses_an_unusable_blas_like_the_cli)
