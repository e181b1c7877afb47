"""Read a prompt dataset (JSONL) with errors that name the file, the line and the fix.

Schema, one JSON object per line:
  id (str, unique), text (str), condition (str)             required
  answer (str), label (int), split ("train"|"test"), ...     optional; other keys kept in meta
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mlx_interp.errors import DataError
from mlx_interp.resources import DATA_ROOT

REQUIRED = ("id", "text", "condition")
OPTIONAL = ("answer", "label", "split")
PROJECT_ROOT = DATA_ROOT  # holds datasets/: the repository, or the installed package


class DatasetError(DataError):
    """A dataset file is missing or malformed; the message names the file and the line."""


def resolve_dataset_path(path: str, key: str = "concept.dataset") -> Path:
    """A dataset path as given, else relative to the project root (so runs work from anywhere).
    ``key`` is the config key that gave it, for the message."""
    if not str(path).strip():
        raise DatasetError(f"{key} is empty; give a file, e.g. {key}=datasets/color_swap.jsonl")
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    if not p.is_absolute() and (PROJECT_ROOT / p).is_file():
        return (PROJECT_ROOT / p).resolve()
    folder = next((q for q in (p, PROJECT_ROOT / p) if q.is_dir()), None)
    if folder is not None:
        inside = sorted(q.name for q in folder.glob("*.json*"))[:5]
        example = Path(path) / (inside[0] if inside else "rows.jsonl")
        raise DatasetError(
            f"{key} {path} is a folder; give a JSONL file (one JSON object per line), e.g. "
            f"{key}={example} (JSON files there: {', '.join(inside) or 'none'})"
        )
    raise DatasetError(
        f"dataset file not found: {path} (looked in the working directory and in "
        f"{PROJECT_ROOT}); set {key}=/path/to/file.jsonl"
    )


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook for json.loads: a key given twice is an error, not last-wins."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise DatasetError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _decoded_lines(path: Path):
    """(line number, text) of a UTF-8 file; other encodings are an error naming the line."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DatasetError(
                f"{path}: the file is UTF-16 (byte-order mark); save it as UTF-8, e.g. "
                f"iconv -f UTF-16 -t UTF-8 {path.name} > fixed.jsonl"
            )
        f.seek(3 if head[:3] == b"\xef\xbb\xbf" else 0)  # a UTF-8 byte-order mark is fine
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"{path}, line {lineno}: byte {raw[err.start : err.start + 1]!r} at column "
                    f"{err.start + 1} is not UTF-8; save the file as UTF-8"
                ) from err


def _check_label(path: Path, lineno: int, label: object) -> None:
    if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
        raise DatasetError(
            f"{path}, line {lineno}: label must be an integer (e.g. 1), not {label!r}; or leave "
            "it out to number the conditions in concept.conditions order"
        )


def read_jsonl(path: Path) -> pd.DataFrame:
    """Rows of a dataset file as a DataFrame with columns id, text, condition, answer, ..., meta.

    Strict: duplicate keys, non-UTF-8 bytes, blank ids/texts/conditions, non-integer labels,
    a condition whose rows disagree on their label and a row without the ``object`` other rows
    give are errors naming the file and line."""
    rows = []
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from err
        except DatasetError as err:
            raise DatasetError(f"{path}, line {lineno}: {err}; keep one") from err
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}, line {lineno}: expected a JSON object")
        missing = [k for k in REQUIRED if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise DatasetError(
                f"{path}, line {lineno}: missing, empty or blank string field(s) {missing}; "
                f"every line needs {list(REQUIRED)}"
            )
        split = obj.get("split")
        if split is not None and split not in ("train", "test"):
            raise DatasetError(f"{path}, line {lineno}: split must be train or test")
        _check_label(path, lineno, obj.get("label"))
        row = {k: obj.get(k) for k in REQUIRED + OPTIONAL}
        extra = {k: v for k, v in obj.items() if k not in REQUIRED + OPTIONAL}
        row["meta"] = json.dumps(extra, sort_keys=True, ensure_ascii=False)
        row["_line"] = lineno
        row["_object"] = obj.get("object")
        rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: the file has no rows")
    check_objects(rows, path)
    df = pd.DataFrame(rows)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        first = dup.iloc[0]
        lines = df.loc[df["id"] == first, "_line"].tolist()
        raise DatasetError(f"{path}: id {first!r} appears more than once (lines {lines})")
    check_labels_agree(df, path)
    return df.drop(columns=["_line", "_object"])


def check_objects(rows: list[dict], path: Path) -> None:
    """``object`` (the words positions and directions at the object read) is given on every
    row or on none: a row without it among rows with it is an error naming its id and line."""
    if all(r["_object"] is None for r in rows):
        return
    given = [r for r in rows if isinstance(r["_object"], str) and r["_object"].strip()]
    for r in rows:
        obj = r["_object"]
        if not isinstance(obj, str) or not obj.strip():
            what = "has no" if obj is None else f"has a blank or non-string ({obj!r})"
            raise DatasetError(
                f"{path}, line {r['_line']}: row {r['id']!r} {what} `object`, while "
                f"{len(given)} other rows name theirs; give every row its object (the words "
                "of the text that object positions and directions read)"
            )


def check_labels_agree(df: pd.DataFrame, path: Path) -> None:
    """Every row of one condition carries the same label, or none of them does."""
    for cond, group in df.groupby("condition", sort=True):
        missing = group["label"].isna()
        given = sorted({int(x) for x in group["label"][~missing]})
        if len(given) > 1 or (given and missing.any()):
            lines = group["_line"].tolist()[:4]
            raise DatasetError(
                f"{path}: the rows of condition {cond!r} disagree on their label ({given}"
                f"{', some have none' if missing.any() else ''}; lines {lines}...); give every "
                "row of a condition the same label, or leave labels out"
            )
