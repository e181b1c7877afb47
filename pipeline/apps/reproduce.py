"""``mlx-interp-reproduce RUN_DIR``: re-run a run folder's saved config and compare the results.

A run folder (``outputs/runs/<date>/<time>``, or one a colleague sent) holds the composed
config Hydra saved (``.hydra/config.yaml``), ``run.json`` (every stage's artifact key and
path) and ``provenance.json`` (package, MLX and Python versions, BLAS, seed, model file
checksum). This tool runs that config again, in a fresh artifact store (default) or reusing
the cache (``--reuse-cache``), into a new run folder, then compares every artifact file's
sha256 (from the manifests), every number of the reports' JSON files and the run folders'
report texts and plots (``report.md``, ``*.png``) byte for byte. It prints ``identical``
(exit 0) or each difference (exit 1); bad input is one ``error:`` line (exit 2).

Artifact keys are compared too, but a different key is not a different result: each one is
explained from the key's parts that the manifests record (the stage's code, its config
slice, the files it names, its upstream keys), or, for an artifact made before keys held the
code's hash, by that change of the key scheme.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx_interp  # noqa: F401  (loads the optimized BLAS before mlx)
from mlx_interp.apps.cli import PROVENANCE
from mlx_interp.engine.integrity import listing_problem
from mlx_interp.errors import MlxInterpError, report_error


class ReproduceError(MlxInterpError, ValueError):
    """The folder is not a run folder this tool can re-run."""


def numbers_differ(a: Any, b: Any, path: str = "", out: list | None = None) -> list[str]:
    """Where two JSON values differ: every number compared exactly (NaN equals NaN)."""
    out = [] if out is None else out
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{where}: only in {'the original' if key in a else 'the re-run'}")
            else:
                numbers_differ(a[key], b[key], where, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            numbers_differ(x, y, f"{path}[{i}]", out)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    elif a != b:
        out.append(f"{path}: {a!r} (original) vs {b!r} (re-run)")
    return out


def _manifest(run_dir: Path, stage: str, record: dict) -> dict | None:
    """The manifest of a run's artifact: through its link, else its recorded path."""
    for folder in (run_dir / "artifacts" / stage, Path(record.get("path", ""))):
        manifest = folder / "_manifest.json"
        if manifest.is_file():
            return json.loads(manifest.read_text(encoding="utf-8"))
    return None


def _manifest_files(run_dir: Path, stage: str, record: dict) -> dict | None:
    """The file checksums of a run's artifact (None when the artifact is gone)."""
    manifest = _manifest(run_dir, stage, record)
    return None if manifest is None else manifest.get("files")


def key_reason(original: dict | None, rerun: dict | None) -> str:
    """Why two artifact keys of one stage differ, from the key parts their manifests record
    (``record``: code, config, files, upstream)."""
    a = (original or {}).get("record") or {}
    b = (rerun or {}).get("record") or {}
    if "code" not in a:
        return (
            "the original was made before artifact keys held the hash of the stage's code (a "
            "hand-bumped version then): the key scheme changed, not the result"
        )
    if "code" not in b:
        return "the re-run's manifest does not record the key's parts"
    why = []
    code = sorted(
        m for m in set(a["code"]) | set(b["code"]) if a["code"].get(m) != b["code"].get(m)
    )
    if code:
        more = f" and {len(code) - 4} more" if len(code) > 4 else ""
        why.append(f"its code changed ({', '.join(code[:4])}{more})")
    config = numbers_differ(a.get("config"), b.get("config"))
    if config:
        why.append(f"its config slice differs ({'; '.join(config[:3])})")
    if a.get("files") != b.get("files"):
        why.append("the files it names differ (dataset or model checksums)")
    ups = a.get("upstream") or {}
    moved = sorted(n for n, k in (b.get("upstream") or {}).items() if ups.get(n) != k)
    if moved:
        why.append(f"upstream key(s) differ ({', '.join(moved)})")
    return "; ".join(why) or "the parts it records are equal: the key scheme changed"


def key_notes(original: Path, rerun: Path) -> list[str]:
    """One line per stage whose artifact key differs, saying why."""
    runs = [json.loads((d / "run.json").read_text(encoding="utf-8")) for d in (original, rerun)]
    notes = []
    for stage in sorted(set(runs[0]) & set(runs[1])):
        a, b = runs[0][stage], runs[1][stage]
        if a["key"] != b["key"]:
            why = key_reason(_manifest(original, stage, a), _manifest(rerun, stage, b))
            notes.append(f"stage {stage}: artifact key {a['key'][:12]} vs {b['key'][:12]}: {why}")
    return notes


def _artifact_dir(run_dir: Path, stage: str, record: dict) -> Path:
    link = run_dir / "artifacts" / stage
    return link if link.exists() else Path(record.get("path", ""))


def same_safetensors(a: Path, b: Path) -> bool:
    """Equal tensors and metadata: safetensors writes its header's keys in hash-map order, so
    two writes of one content can differ in bytes."""
    import numpy as np
    from safetensors import safe_open

    def content(path: Path):
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    try:
        (meta_a, ta), (meta_b, tb) = content(a), content(b)
    except Exception:  # unreadable: not the same
        return False
    return (
        meta_a == meta_b
        and ta.keys() == tb.keys()
        and all(ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]) for k in ta)
    )


def compare_runs(original: Path, rerun: Path) -> list[str]:
    """Differences of results between two run folders: the stages run, artifact file
    checksums, report numbers, report texts and plots (keys: :func:`key_notes`)."""
    diffs: list[str] = []
    runs = [json.loads((d / "run.json").read_text(encoding="utf-8")) for d in (original, rerun)]
    for stage in sorted(set(runs[0]) | set(runs[1])):
        a, b = runs[0].get(stage), runs[1].get(stage)
        if a is None or b is None:
            diffs.append(f"stage {stage}: only in {'the original' if b is None else 'the re-run'}")
            continue
        files = _manifest_files(original, stage, a), _manifest_files(rerun, stage, b)
        if files[0] is None:
            diffs.append(f"stage {stage}: the original artifact is gone; its files not compared")
            continue
        for name, run, rec, listed in (
            ("original", original, a, files[0]),
            ("re-run", rerun, b, files[1]),
        ):
            problem = listing_problem(_artifact_dir(run, stage, rec), listed)
            if problem:
                diffs.append(f"stage {stage}: the {name}'s artifact fails its checksums: {problem}")
        for rel in sorted(set(files[0]) | set(files[1] or {})):
            x, y = files[0].get(rel), (files[1] or {}).get(rel)
            if x is not None and y is not None and x.get("sha256") == y.get("sha256"):
                continue
            if x is not None and y is not None and rel.endswith(".safetensors"):
                pair = (_artifact_dir(d, stage, r) / rel for d, r in ((original, a), (rerun, b)))
                if same_safetensors(*pair):
                    continue
            diffs.append(f"stage {stage}: {rel} differs (sha256)")
    diffs += report_files_differ(original, rerun)
    for report in sorted(original.glob("*.json")):
        if report.name in ("run.json", PROVENANCE):
            continue
        other = rerun / report.name
        if not other.is_file():
            diffs.append(f"{report.name}: missing in the re-run")
            continue
        for d in numbers_differ(
            *(json.loads(p.read_text(encoding="utf-8")) for p in (report, other))
        ):
            diffs.append(f"{report.name}: {d}")
    return diffs


REPORT_FILES = ("*.md", "*.png")  # compared whole; the reports' JSON number by number


def report_files_differ(original: Path, rerun: Path) -> list[str]:
    """The run folders' report texts and plots (``report.md``, ``*.png``), byte for byte:
    a report edited by hand, or a plot drawn differently, is a difference."""
    diffs = []
    names = {p.name for pattern in REPORT_FILES for d in (original, rerun) for p in d.glob(pattern)}
    for name in sorted(names):
        a, b = original / name, rerun / name
        if not (a.is_file() and b.is_file()):
            diffs.append(f"{name}: only in {'the original' if a.is_file() else 'the re-run'}")
        elif a.read_bytes() != b.read_bytes():
            diffs.append(f"{name}: differs from the re-run's{_first_line_differing(a, b)}")
    return diffs


def _first_line_differing(a: Path, b: Path) -> str:
    """`` (line N: 'original' vs 're-run')`` for two texts, else nothing."""
    if a.suffix != ".md":
        return " (bytes)"
    lines = [p.read_text(encoding="utf-8", errors="replace").splitlines() for p in (a, b)]
    for i in range(max(map(len, lines))):
        x, y = (ls[i] if i < len(ls) else "" for ls in lines)
        if x != y:
            return f" (line {i + 1}: {x[:60]!r} vs {y[:60]!r})"
    return " (line endings)"


def environment_notes(original: Path, rerun: Path) -> list[str]:
    """Provenance entries that differ (versions, BLAS): context for differences, not ones."""
    paths = [d / PROVENANCE for d in (original, rerun)]
    if not all(p.is_file() for p in paths):
        return ["the original run has no provenance.json (made by an older version)"]
    a, b = (json.loads(p.read_text(encoding="utf-8")) for p in paths)
    return numbers_differ(
        {k: v for k, v in a.items() if k != "platform"},
        {k: v for k, v in b.items() if k != "platform"},
    )


def reproduce(
    run_dir: Path, out: Path, reuse_cache: bool
) -> tuple[list[str], list[str], list[str]]:
    """Re-run ``run_dir``'s config into ``out``; (differences, key notes, environment notes)."""
    from omegaconf import DictConfig, OmegaConf

    from mlx_interp.apps.cli import run_experiment
    from mlx_interp.engine.schema import register_configs

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file() or not (run_dir / "run.json").is_file():
        raise ReproduceError(
            f"{run_dir} is not a complete run folder (needs .hydra/config.yaml and run.json); "
            "give the folder `mlx-interp` printed as 'run directory:'"
        )
    if out.exists() and any(out.iterdir()):
        raise ReproduceError(f"--out {out} is not empty; give a new folder")
    register_configs()
    cfg = OmegaConf.load(saved)
    if not isinstance(cfg, DictConfig):
        raise ReproduceError(f"{saved} is not a config mapping; is this a run folder?")
    if not reuse_cache:
        OmegaConf.update(cfg, "paths.artifacts", str(out / "artifacts_store"), merge=False)
    out.mkdir(parents=True, exist_ok=True)
    run_experiment(cfg, out)
    return compare_runs(run_dir, out), key_notes(run_dir, out), environment_notes(run_dir, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-interp-reproduce",
        description="Re-run a run folder's saved config; print 'identical' or the differences.",
    )
    parser.add_argument("run_dir", help="a run folder (outputs/runs/<date>/<time>)")
    parser.add_argument("--out", help="new run folder (default: <run_dir>.reproduce-<time>)")
    parser.add_argument(
        "--reuse-cache", action="store_true", help="use the run's artifact store (default: fresh)"
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser().resolve()
    out = Path(args.out).expanduser() if args.out else None
    out = out or run_dir.with_name(f"{run_dir.name}.reproduce-{time.strftime('%H-%M-%S')}")
    try:
        from mlx_interp.blas import log_blas

        log_blas()
        diffs, keys, notes = reproduce(run_dir, out.resolve(), args.reuse_cache)
    except MlxInterpError as err:
        return report_error(err)
    for note in notes:
        print(f"note: environment differs: {note}")
    for note in keys:
        print(f"note: {note}")
    if diffs:
        for d in diffs:
            print(f"differs: {d}")
        print(f"{len(diffs)} difference(s) between {run_dir} and {out}")
        return 1
    keys_too = f"; {len(keys)} artifact key(s) differ, as noted" if keys else ""
    print(
        f"identical: {out} reproduces {run_dir} (every artifact checksum, report number, "
        f"report.md and plot{keys_too})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
