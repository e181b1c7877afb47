"""The bad-input catalogue: every case is one clear message naming the problem and the fix.

Config-level cases go through the real entry point (``mlx-interp``'s Hydra main, in-process):
exit status 2 and one ``error:`` line for our checks, Hydra's own message (exit 1) for
composition errors, never a traceback. The rest are function-level. A representative subset
checks that artifacts computed before the failure are still there and valid.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import mlx_interp.apps.cli as cli
from mlx_interp.engine.cache import ArtifactError, ArtifactStore
from mlx_interp.engine.dag import stage_keys
from mlx_interp.models.gguf import embedded_gguf_path
from mlx_interp.stages import STAGES
from tests.helpers import compose_config, write_dataset

# --- harness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per module: the dataset and an artifact store shared by the cases."""
    root = tmp_path_factory.mktemp("bad_input")
    write_dataset(root / "d.jsonl", n_per_class=4, conditions=("green", "red", "control"))
    return root


def _base(root: Path, dataset: Path | None = None) -> list[str]:
    return [
        "model=tiny_random",
        f"concept.dataset={dataset or root / 'd.jsonl'}",
        "concept.fewshot=[]",
        f"paths.outputs={root / 'outputs'}",
        f"hydra.run.dir={root / 'run'}",
        "steer.layer=2",
        "steer.n_random=2",
        "steer.confirm_n=2",
    ]


@pytest.fixture
def cli_run(workdir, monkeypatch, capsys):
    """Run ``mlx-interp <base overrides> <extra>`` in-process: (exit status, stderr)."""
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level

    def run(*extra: str, base: list[str] | None = None) -> tuple[int, str]:
        given = {e.split("=", 1)[0] for e in extra}  # extra replaces a base override
        base = [b for b in (base or _base(workdir)) if b.split("=", 1)[0] not in given]
        argv = [*base, *extra]
        monkeypatch.setattr(sys, "argv", ["mlx-interp", *argv])
        try:
            cli.main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            root_logger.handlers[:] = handlers  # Hydra reconfigures logging per run
            root_logger.setLevel(level)
        return code, capsys.readouterr().err

    return run


def assert_clear(code: int, err: str, *words: str, status: int = 2) -> None:
    """A clean failure: the exit status, no traceback, every key word in the message."""
    assert code == status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in err, f"{word!r} not in: {err[-2000:]}"
    if status == 2:  # our own checks: one line
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, err[-2000:]


def _store(root: Path) -> ArtifactStore:
    return ArtifactStore(root / "outputs" / "artifacts")


def _keys(overrides: list[str], targets: list[str]) -> dict[str, str]:
    plain = OmegaConf.to_container(compose_config(overrides), resolve=True)
    return stage_keys(STAGES, targets, plain)


def _valid(root: Path, stage: str, key: str) -> bool:
    return _store(root).get(stage, key) is not None


# --- command line and config composition ---------------------------------------------------


def test_override_of_a_key_that_does_not_exist(cli_run):
    code, err = cli_run("capture.batchsize=4")
    assert_clear(code, err, "capture.batchsize", "Key 'batchsize' not in 'CaptureConfig'", status=1)


def test_seed_not_an_int(cli_run):
    code, err = cli_run("seed=abc")
    assert_clear(code, err, "seed=abc", "could not be converted to Integer", status=1)


def test_unknown_model_config_lists_the_options(cli_run):
    code, err = cli_run("model=nope")
    assert_clear(code, err, "Could not find 'model/nope'", "tiny_random", status=1)


def test_unknown_experiment_lists_the_options(cli_run):
    code, err = cli_run("experiment=nope")
    assert_clear(code, err, "experiment/nope", "capture_only", status=1)


def test_experiment_given_twice(cli_run):
    code, err = cli_run("experiment=color_swap", "experiment=capture_only")
    assert_clear(code, err, "experiment is given twice", "experiment=[a,b]")


def test_any_override_given_twice(cli_run):
    code, err = cli_run("seed=1", "seed=2")
    assert_clear(code, err, "seed is given twice", "give it once")


def test_conflicting_experiment_overlays(cli_run):
    code, err = cli_run("experiment=[color_swap,capture_only]")
    assert_clear(code, err, "both set pipeline.stages", "capture_only would silently win")


def test_experiment_group_also_forced_on_the_command_line_is_a_warning():
    notes = cli.forced_groups(["experiment=color_swap", "concept=sycophancy", "seed=3"])
    assert notes == [
        "experiment color_swap sets concept=color_swap but the command line gives "
        "concept=sycophancy: the command line wins"
    ]
    assert cli.forced_groups(["experiment=color_swap", "concept=color_swap"]) == []


def test_unknown_stage_in_pipeline_stages(cli_run):
    code, err = cli_run("pipeline.stages=[capture,nope]")
    assert_clear(code, err, "unknown stage 'nope'", "known stages", "pipeline.stages")


def test_outputs_folder_under_a_file(cli_run, workdir):
    blocker = workdir / "a_file"
    blocker.write_text("not a folder")
    code, err = cli_run(f"paths.outputs={blocker / 'outputs'}")
    assert_clear(code, err, "is a file, not a folder", "paths.outputs=")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_outputs_folder(cli_run, workdir):
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = cli_run(f"paths.outputs={locked}", f"hydra.run.dir={locked / 'run'}")
    finally:
        locked.chmod(0o755)
    assert_clear(code, err, "is not writable", "paths.outputs=")


def test_read_only_store_is_caught_before_any_stage(tmp_path, monkeypatch):
    """Function-level twin of the chmod case that also bites as root: os.access says no."""
    real_access = os.access
    locked = tmp_path / "readonly_store"
    locked.mkdir()
    monkeypatch.setattr(
        "mlx_interp.engine.cache.os.access",
        lambda p, m: False if Path(p) == locked else real_access(p, m),
    )
    with pytest.raises(ArtifactError) as info:
        ArtifactStore(locked / "artifacts").check_writable()
    assert "is not writable" in str(info.value) and "paths.outputs=" in str(info.value)
    assert not (locked / "artifacts").exists()  # nothing was written


# --- dataset ---------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
        encoding="utf-8",
    )
    return path


def _row(i: int, cond: str = "red", **kw) -> dict:
    return {"id": f"q{i}", "text": f"What colour is thing {i}?", "condition": cond, **kw}


def test_missing_dataset_file(cli_run, workdir):
    code, err = cli_run(f"concept.dataset={workdir / 'absent.jsonl'}")
    assert_clear(code, err, "dataset file not found", "absent.jsonl", "concept.dataset=")


def test_malformed_jsonl_line_names_the_line(cli_run, workdir):
    bad = _jsonl(workdir / "bad.jsonl", [_row(1), _row(2), '{"id": "q3", "text": '])
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "bad.jsonl, line 3", "not valid JSON")


def test_dataset_line_missing_a_required_field(cli_run, workdir):
    bad = _jsonl(workdir / "nofield.jsonl", [_row(1), {"id": "q2", "text": "Hi?"}])
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "line 2", "'condition'", "every line needs")


def test_duplicate_ids(cli_run, workdir):
    bad = _jsonl(workdir / "dup.jsonl", [_row(1), _row(1, "green")])
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "id 'q1' appears more than once", "lines [1, 2]")


def test_bad_split_value(cli_run, workdir):
    bad = _jsonl(workdir / "split.jsonl", [_row(1, split="validation")])
    code, err = cli_run(f"concept.dataset={bad}")
    assert_clear(code, err, "line 1", "split must be train or test")


def test_empty_dataset_file(cli_run, workdir):
    empty = workdir / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    code, err = cli_run(f"concept.dataset={empty}")
    assert_clear(code, err, "empty.jsonl", "has no rows")


def test_empty_condition(cli_run):
    code, err = cli_run("concept.conditions=[green,red,purple]", "experiment=capture_only")
    assert_clear(code, err, "['purple'] have no rows", "concept.conditions")


# --- model ------------------------------------------------------------------------------------


def test_unknown_model_source(cli_run):
    code, err = cli_run("model.source=hub")
    assert_clear(code, err, "unknown model.source 'hub'", "embedded")


def test_gguf_path_that_does_not_exist(cli_run, workdir):
    code, err = cli_run("model=gguf", f"model.path={workdir / 'absent.gguf'}")
    assert_clear(code, err, "GGUF file not found", "check model.path")


def test_local_model_folder_without_config(cli_run, workdir):
    folder = workdir / "not_a_model"
    folder.mkdir(exist_ok=True)
    code, err = cli_run("model.source=mlx_lm", f"model.path={folder}")
    assert_clear(code, err, "not an mlx-lm model folder (no config.json)", "mlx_lm.convert")


def test_unknown_hub_model_id_offline(monkeypatch):
    import huggingface_hub.constants

    from mlx_interp.models.loading import ModelLoadError, load_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model({"name": "x", "source": "mlx_lm", "path": "nobody-xyz/no-such-model-123"})
    assert "nobody-xyz/no-such-model-123" in str(info.value)
    assert "model=smollm2_135m (embedded)" in str(info.value)


def test_gguf_of_an_unsupported_architecture(cli_run, workdir):
    path = workdir / "mamba.gguf"
    mx.save_gguf(str(path), {"x": mx.zeros((2,))}, metadata={"general.architecture": "mamba"})
    code, err = cli_run("model=gguf", f"model.path={path}")
    assert_clear(code, err, "architecture 'mamba' is not supported", "mlx_lm.convert")


def test_truncated_gguf(cli_run, workdir):
    path = workdir / "truncated.gguf"
    with open(embedded_gguf_path(), "rb") as src:
        path.write_bytes(src.read(1 << 20))
    code, err = cli_run("model=gguf", f"model.path={path}")
    assert_clear(code, err, "truncated or corrupt", "check the path")


def test_bad_dequantize_option(cli_run):
    code, err = cli_run("model.dequantize=maybe")
    assert_clear(code, err, "model.dequantize must be auto, true or false")


# --- capture --------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_keeps_the_prompts(cli_run, workdir):
    code, err = cli_run("capture.max_tokens=5", "experiment=capture_only")
    assert_clear(code, err, "tokens, over the limit of 5", "capture.max_tokens")
    keys = _keys(_base(workdir)[:4] + ["capture.max_tokens=5"], ["capture"])
    assert _valid(workdir, "prompts", keys["prompts"])  # computed before, still valid
    assert not _valid(workdir, "capture", keys["capture"])


def test_layer_index_out_of_range(cli_run):
    code, err = cli_run("capture.layers=[1,9]", "experiment=capture_only")
    assert_clear(code, err, "layer 9 is out of range", "valid: -4..3")


def test_negative_batch_size(cli_run):
    code, err = cli_run("capture.batch_size=-1", "experiment=capture_only")
    assert_clear(code, err, "capture.batch_size must be >= 1", "-1")


def test_unknown_capture_positions(cli_run):
    code, err = cli_run("capture.positions=middle", "experiment=capture_only")
    assert_clear(code, err, "capture.positions must be one of", "'middle'")


# --- directions, steering, scoring (the full DAG up to the failing stage) -------------------


def test_alpha_nan_keeps_every_upstream_artifact(cli_run, workdir):
    code, err = cli_run("steer.alpha=nan")
    assert_clear(code, err, "steer.alpha must be a finite number", "nan")
    keys = _keys(_base(workdir)[:4] + _base(workdir)[5:], ["report"])
    for stage in ("prompts", "capture", "directions", "baseline"):
        assert _valid(workdir, stage, keys[stage]), stage
    code, _ = cli_run("steer.alpha=1.0")  # the fixed run reuses them
    assert code in (0, None)
    run = json.loads((workdir / "run" / "run.json").read_text())
    assert {s for s, r in run.items() if r["cached"]} >= {"prompts", "capture", "directions"}


def test_alpha_infinite(cli_run):
    code, err = cli_run("steer.alpha=inf")
    assert_clear(code, err, "steer.alpha must be a finite number", "inf")


def test_unknown_steering_mode(cli_run):
    code, err = cli_run("steer.mode=sideways")
    assert_clear(code, err, "unknown steering mode 'sideways'", "valid modes", "reflect")


def test_unknown_scorer(cli_run):
    code, err = cli_run("score.scorer=nope")
    assert_clear(code, err, "unknown scorer 'nope'", "valid scorers")


def test_unknown_direction_method(cli_run):
    code, err = cli_run("directions.method=nope")
    assert_clear(code, err, "unknown method 'nope'", "choose one of")


def test_steering_layer_out_of_range(cli_run):
    code, err = cli_run("steer.layer=9")
    assert_clear(code, err, "out of range", "valid: -4..3")


def _tiny_llama():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-5,
        vocab_size=32,
    )
    return llama.Model(args)


@pytest.mark.parametrize(
    "vector,words",
    [
        (np.zeros(16, dtype=np.float32), ("all zeros", "check that the two classes differ")),
        (np.full(16, np.nan, dtype=np.float32), ("NaN", "recompute it from finite activations")),
    ],
    ids=["zero-norm", "nan"],
)
def test_direction_of_zero_norm_or_nan(vector, words):
    from mlx_interp.interventions.steering import LayerEdit, SteeringError, steer

    model = _tiny_llama()
    with pytest.raises(SteeringError) as info:
        with steer(model, [LayerEdit(layer=1, vector=vector)], "add", 1.0):
            pass
    for word in words:
        assert word in str(info.value)
    assert type(model.model.layers[1]).__name__ == "TransformerBlock"  # model left untouched


def test_direction_of_the_wrong_width():
    from mlx_interp.interventions.steering import LayerEdit, SteeringError, steer

    with pytest.raises(SteeringError, match="hidden size .* is 16; use a direction computed"):
        with steer(_tiny_llama(), [LayerEdit(layer=0, vector=np.ones(8))], "add", 1.0):
            pass


# --- probes (function level: the stage is being wired) ---------------------------------------


def test_class_with_fewer_examples_than_cv_folds():
    from mlx_interp.analysis.probes import ProbeError, cross_validate_layer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4))
    y = ["a"] * 10 + ["b"] * 2
    with pytest.raises(ProbeError, match=r"class 'b' has 2 examples, fewer than the 5 CV folds"):
        cross_validate_layer(x, y, k=5)
    with pytest.raises(ProbeError, match="lower probes.folds"):
        cross_validate_layer(x, y, k=5)


def test_probe_with_a_single_class():
    from mlx_interp.analysis.probes import ProbeError, cross_validate_layer

    with pytest.raises(ProbeError, match="at least 2 conditions"):
        cross_validate_layer(np.ones((6, 3)), ["a"] * 6, k=2)


# --- artifacts --------------------------------------------------------------------------------


def test_hand_edited_artifact_is_recomputed_never_trusted(tmp_path):
    write_dataset(tmp_path / "d.jsonl", n_per_class=3, conditions=("green", "red", "control"))
    overrides = _base(tmp_path)[:4] + ["experiment=capture_only"]
    first = cli.run_experiment(compose_config(overrides), tmp_path / "r1")
    prompts_dir = Path(first["prompts"]["path"])
    (prompts_dir / "prompts.parquet").write_bytes(b"edited by hand")
    again = cli.run_experiment(compose_config(overrides), tmp_path / "r2")
    assert not again["prompts"]["cached"]  # key matches, content does not: recomputed
    assert again["capture"]["cached"]  # same key downstream: still valid, kept
    aside = list(prompts_dir.parent.glob("*.invalid-*"))
    assert len(aside) == 1 and (aside[0] / "prompts.parquet").read_bytes() == b"edited by hand"
    assert len(pd.read_parquet(prompts_dir / "prompts.parquet")) == 9


def test_disk_full_during_capture_is_one_line_and_keeps_the_prompts(cli_run, workdir, monkeypatch):
    import errno

    import mlx_interp.stages.capture as capture_stage

    def full(table, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(capture_stage, "write_part", full)
    code, err = cli_run("experiment=capture_only", "capture.batch_size=5")
    assert_clear(code, err, "disk full while writing artifact capture/", "paths.outputs=")
    keys = _keys(_base(workdir)[:4] + ["capture.batch_size=5"], ["capture"])
    assert _valid(workdir, "prompts", keys["prompts"])
    assert not _valid(workdir, "capture", keys["capture"])


def test_contrast_naming_a_condition_without_prompts(cli_run):
    code, err = cli_run("directions.contrast.pos=purple")
    assert_clear(code, err, "condition 'purple' has no prompts", "fix directions.contrast")


def test_unknown_steering_positions(cli_run):
    code, err = cli_run("steer.positions=bogus")
    assert_clear(code, err, "steer.positions must be one of", "'suffix'")


@pytest.mark.parametrize(
    "override,words",
    [
        ("prompts.test_fraction=1.5", ("prompts.test_fraction must be in [0, 1)", "1.5")),
        ("prompts.format=html", ("prompts.format must be one of", "'html'")),
    ],
)
def test_bad_prompt_options(cli_run, override, words):
    code, err = cli_run(override, "experiment=capture_only")
    assert_clear(code, err, *words)
