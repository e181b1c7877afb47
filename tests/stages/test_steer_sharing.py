"""Jobs run in one process (Hydra's basic launcher) share the loaded model and the unsteered
states: a second steering setting computes its own steering only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mlx_interp.apps.cli import run_experiment
from mlx_interp.interventions import unsteered
from tests.helpers import compose_config, write_dataset


def _overrides(tmp_path: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_random",
        f"concept.dataset={dataset}",
        f"paths.outputs={tmp_path / 'outputs'}",
        "steer.layer=2",
        "steer.n_random=3",
        "steer.confirm_n=4",
        "steer.positions=last",
        "score.fluency.n_prompts=4",
        *extra,
    ]


def test_a_second_alpha_in_the_same_process_reuses_the_unsteered_states(tmp_path, monkeypatch):
    dataset = write_dataset(
        tmp_path / "d.jsonl", n_per_class=5, conditions=("green", "red", "control")
    )
    unsteered.STORE.clear()
    computed = []
    real = unsteered.last_logits

    def counting(model, tokens, *args, **kwargs):
        computed.append(tokens.shape[0])
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(unsteered, "last_logits", counting)
    first = run_experiment(compose_config(_overrides(tmp_path, dataset)), tmp_path / "r1")
    assert sum(computed) > 0  # the baseline stage computed the states
    held = unsteered.STORE.nbytes
    assert held > 0
    computed.clear()
    second = run_experiment(
        compose_config(_overrides(tmp_path, dataset, "steer.alpha=2.5")), tmp_path / "r2"
    )
    assert second["baseline"]["cached"] and not second["steer"]["cached"]
    assert computed == []  # no unsteered state computed again: all came from the store
    a = pd.read_parquet(Path(first["steer"]["path"]) / "generations.parquet")
    b = pd.read_parquet(Path(second["steer"]["path"]) / "generations.parquet")
    assert len(a) == len(b) and not a["margin"].equals(b["margin"])
    unsteered.STORE.clear()
