"""Test helpers: compose the real Hydra config and write small datasets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlx_interp.apps.cli import CONF_DIR


@dataclass(frozen=True)
class DataInputs:
    """Inputs of a toy stage: the config key ``data``, a plain mapping."""

    data: dict


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


# --- the bad-input catalogue's harness (tests/test_bad_input*.py) ---------------------------


def _base(root: Path, dataset: Path | None = None) -> list[str]:
    """Base overrides of a catalogue run: the tiny model, a small dataset, a private store."""
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


def store_snapshot(store: Path) -> dict[str, str]:
    """sha256 of every file of every completed artifact under ``store`` (key folders only)."""
    import hashlib

    out = {}
    if not store.is_dir():
        return out
    for path in sorted(store.glob("*/*/**/*")):
        key_folder = path.relative_to(store).parts[1]
        if path.is_file() and len(key_folder) == 64 and "." not in key_folder:
            out[path.relative_to(store).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed_artifacts(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files of artifacts completed before a run that it removed or altered."""
    return sorted(rel for rel, digest in before.items() if after.get(rel) != digest)


def assert_clear(code: int, err: str, *words: str, status: int = 2) -> None:
    """A clean failure: the exit status, no traceback, every key word in the message."""
    assert code == status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in err, f"{word!r} not in: {err[-2000:]}"
    if status == 2:  # our own checks: one line
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, err[-2000:]
