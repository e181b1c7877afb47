"""Read a prompt dataset (JSONL) with errors that name the file, the line and the fix.

Schema, one JSON object per line:
  id (str, unique), text (str), condition (str)             required
  answer (str), label (int), split ("train"|"test"), ...     optional; other keys kept in meta
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mlx_interp.resources import DATA_ROOT

REQUIRED = ("id", "text", "condition")
OPTIONAL = ("answer", "label", "split")
PROJECT_ROOT = DATA_ROOT  # holds datasets/: the repository, or the installed package


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the line."""


def resolve_dataset_path(path: str) -> Path:
    """A dataset path as given, else relative to the project root (so runs work from anywhere)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    if not p.is_absolute() and (PROJECT_ROOT / p).is_file():
        return (PROJECT_ROOT / p).resolve()
    raise DatasetError(
        f"dataset file not found: {path} (looked in the working directory and in "
        f"{PROJECT_ROOT}); set concept.dataset=/path/to/file.jsonl"
    )


def read_jsonl(path: Path) -> pd.DataFrame:
    """Rows of a dataset file as a DataFrame with columns id, text, condition, answer, ..., meta."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}, line {lineno}: expected a JSON object")
            missing = [k for k in REQUIRED if not isinstance(obj.get(k), str) or not obj[k]]
            if missing:
                raise DatasetError(
                    f"{path}, line {lineno}: missing or empty string field(s) {missing}; "
                    f"every line needs {list(REQUIRED)}"
                )
            split = obj.get("split")
            if split is not None and split not in ("train", "test"):
                raise DatasetError(f"{path}, line {lineno}: split must be train or test")
            row = {k: obj.get(k) for k in REQUIRED + OPTIONAL}
            extra = {k: v for k, v in obj.items() if k not in REQUIRED + OPTIONAL}
            row["meta"] = json.dumps(extra, sort_keys=True, ensure_ascii=False)
            row["_line"] = lineno
            rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: the file has no rows")
    df = pd.DataFrame(rows)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        first = dup.iloc[0]
        lines = df.loc[df["id"] == first, "_line"].tolist()
        raise DatasetError(f"{path}: id {first!r} appears more than once (lines {lines})")
    return df.drop(columns="_line")
