"""Content-addressed artifact store: one folder per (stage, key), complete only with a manifest.

A stage writes into ``<stage>/<key>.partial/``; the manifest is written last and the folder
is renamed into place, so a folder without a valid manifest is never read. The partial
folder survives a crash, so a stage that writes part files can resume from them. A lock
per key keeps two jobs of one sweep from computing the same artifact twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"  # leading "_": Parquet readers skip it when they list a folder


class ArtifactError(RuntimeError):
    """An artifact could not be written or read; the message says what to do."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal inputs give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_key(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (hex, 64 chars)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in an artifact folder but the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = p.stat().st_size
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Artifact:
    """A completed artifact: where it is and what its manifest says."""

    stage: str
    key: str
    path: Path
    manifest: dict
    cached: bool  # True when found complete, False when computed in this call


class ArtifactStore:
    """Artifacts under ``root/<stage>/<key>/``, each completed by a manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def read_manifest(self, stage: str, key: str) -> dict | None:
        """The manifest of a complete, untouched artifact, else None."""
        folder = self.path(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if manifest.get("key") != key or manifest.get("stage") != stage:
            return None
        if manifest.get("files") != _listing(folder):
            return None
        return manifest

    def get(self, stage: str, key: str) -> Artifact | None:
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            return None
        return Artifact(stage, key, self.path(stage, key), manifest, cached=True)

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive lock on one artifact key, across processes (flock)."""
        lock_dir = self.root / stage / ".locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ArtifactError(
                f"cannot write to the artifact store {self.root} ({err.strerror}); "
                "make it writable or point paths.artifacts at a writable folder"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def build(
        self,
        stage: str,
        key: str,
        compute: Callable[[Path], dict | None],
        record: dict | None = None,
    ) -> Artifact:
        """Return the artifact, computing it with ``compute(partial_dir)`` if needed.

        ``compute`` writes files into the partial folder it is given (which may hold
        parts from an interrupted attempt) and returns a small summary for the manifest.
        """
        found = self.get(stage, key)
        if found is not None:
            return found
        with self.lock(stage, key):
            found = self.get(stage, key)  # another job may have finished it meanwhile
            if found is not None:
                return found
            final = self.path(stage, key)
            if final.exists():  # edited by hand or corrupt: keep it aside, never trust it
                aside = final.with_name(f"{key}.invalid-{int(time.time())}")
                log.warning(
                    "artifact %s/%s fails its manifest check; moved to %s", stage, key, aside.name
                )
                os.replace(final, aside)
            partial = self.partial_path(stage, key)
            partial.mkdir(parents=True, exist_ok=True)
            started = time.time()
            try:
                summary = compute(partial) or {}
            except OSError as err:
                raise ArtifactError(
                    f"stage {stage!r} failed writing {partial} ({err.strerror}); what was "
                    "completed before is intact; free disk space or fix permissions, then "
                    "re-run to resume"
                ) from err
            manifest = {
                "stage": stage,
                "key": key,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - started, 3),
                "summary": summary,
                "record": record or {},
                "files": _listing(partial),
            }
            write_json_atomic(partial / MANIFEST, manifest)
            os.replace(partial, final)
            _fsync_dir(final.parent)
            return Artifact(stage, key, final, manifest, cached=False)

    def remove(self, stage: str, key: str) -> None:
        """Delete one artifact (used by `clean` tooling and tests)."""
        shutil.rmtree(self.path(stage, key), ignore_errors=True)
