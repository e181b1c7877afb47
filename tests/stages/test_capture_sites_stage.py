"""capture.sites: the capture stage also records sites inside layers (attention, MLP, heads)
into sites/, equal to mlx_interp.interventions.sites on the same prompts; the residual rows
are unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlx_interp.apps.cli import run_experiment
from mlx_interp.interventions.sites import SiteError, capture_sites_batch
from mlx_interp.io.activations import read_activations, read_sites
from mlx_interp.models.loading import load_model
from tests.helpers import compose_config, write_dataset


def _cfg(tmp_path: Path, *extra: str):
    data = write_dataset(tmp_path / "d.jsonl", n_per_class=5, conditions=("green", "red"))
    return compose_config(
        [
            "model=tiny_random",
            f"concept.dataset={data}",
            "concept.fewshot=[]",
            "concept.conditions=[green,red]",
            f"paths.outputs={tmp_path / 'out'}",
            "experiment=capture_only",
            "capture.batch_size=4",
            *extra,
        ]
    )


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_capture_stage_records_sites_like_the_sites_module(tmp_path, positions):
    sites = ["layers.1.mlp", "layers.-1.attn", "layers.2.attn.heads"]
    cfg = _cfg(tmp_path, f"capture.positions={positions}", f"capture.sites=[{','.join(sites)}]")
    out = run_experiment(cfg, tmp_path / "run")
    art = Path(out["capture"]["path"])
    rows = read_sites(art)
    names = ["layers.1.mlp", "layers.2.attn.heads", "layers.3.attn"]
    assert sorted(rows["site"].unique()) == names
    assert out["capture"]["summary"]["sites"] == names
    prompts = pd.read_parquet(Path(out["prompts"]["path"]) / "prompts.parquet")
    lm = load_model(dict(cfg.model))
    seqs = [list(map(int, t)) for t in prompts["tokens"]]
    want = capture_sites_batch(lm.model, seqs, names, positions, lm.pad_id)
    for name in names:
        got = rows[rows["site"] == name].set_index("prompt_id").loc[prompts["prompt_id"]]
        mat = np.stack(got["vector"].to_numpy())
        np.testing.assert_allclose(mat, want[name].reshape(len(seqs), -1), rtol=1e-5, atol=1e-5)
        assert (got["layer"] == int(name.split(".")[1])).all()
    # the residual rows are what a capture without sites gives
    plain = run_experiment(_cfg(tmp_path, f"capture.positions={positions}"), tmp_path / "r2")
    a = read_activations(art).sort_values(["layer", "prompt_id"])
    b = read_activations(Path(plain["capture"]["path"])).sort_values(["layer", "prompt_id"])
    np.testing.assert_array_equal(np.stack(a["vector"]), np.stack(b["vector"]))


def test_a_bad_site_is_a_clear_error_before_anything_is_captured(tmp_path):
    with pytest.raises(SiteError, match="layers.1.nope"):
        run_experiment(_cfg(tmp_path, "capture.sites=[layers.1.nope]"), tmp_path / "run")


def test_new_sites_are_captured_and_patterns_refused(tmp_path):
    from mlx_interp.errors import ConfigError

    names = ["layers.0.resid_mid", "layers.1.resid_pre", "blocks.2.attn.hook_q"]  # width 32
    cfg = _cfg(tmp_path, f"capture.sites=[{','.join(names)}]", "capture.positions=last")
    out = run_experiment(cfg, tmp_path / "run")
    rows = read_sites(Path(out["capture"]["path"]))
    want = ["layers.0.resid_mid", "layers.1.resid_pre", "layers.2.attn.q"]
    assert sorted(rows["site"].unique()) == want
    with pytest.raises(ConfigError, match="one value per key token"):
        run_experiment(_cfg(tmp_path, "capture.sites=[layers.1.attn.pattern]"), tmp_path / "r2")
    with pytest.raises(ConfigError, match="mixes vector widths"):
        run_experiment(
            _cfg(tmp_path, "capture.sites=[layers.1,layers.1.mlp.post]"), tmp_path / "r3"
        )
