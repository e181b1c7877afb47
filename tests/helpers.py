"""Test helpers: compose the real Hydra config and write small datasets."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlx_interp.apps.cli import CONF_DIR


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed root config, exactly as `mlx-interp` would see it (no run dir)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def write_dataset(path: Path, n_per_class: int = 6, conditions=("green", "red")) -> Path:
    """A small colour-swap style JSONL file with questions of varying length."""
    rows = []
    for cond in conditions:
        for i in range(n_per_class):
            words = " ".join(["very"] * (i % 4))
            rows.append(
                {
                    "id": f"{cond}-{i}",
                    "text": f"What {words} colour is {cond} thing number {i}?",
                    "condition": cond,
                    "answer": cond,
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path
